"""Writing a bundle directory safely: what may be replaced, and the final swap into place.

Every writer (the trainer's export, `vitrine bundle quantize`) stages the new bundle beside its
destination and renames it in, so a failed write leaves the old bundle, or nothing."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from vitrine.errors import UserError
from vitrine.runtime.manifest import MANIFEST_FILE


def check_bundle_destination(out_dir: Path, overwrite: bool, *, error: type[UserError] = UserError,
                             overwrite_hint: str = "overwrite=True") -> None:  # fmt: skip
    """Refuse to write over anything but an empty directory, or a bundle when `overwrite` is set."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise error(f"{out_dir} exists and is not a directory")
    is_bundle = (out_dir / MANIFEST_FILE).is_file()
    if not is_bundle and any(out_dir.iterdir()):
        raise error(f"{out_dir} exists and is not a model bundle: refusing to replace it")
    if is_bundle and not overwrite:
        raise error(f"{out_dir} already holds a bundle (pass {overwrite_hint} to replace it)")


def swap_bundle_into_place(staged: Path, out_dir: Path) -> None:
    """Rename the finished bundle into place; an old bundle is moved aside first and then removed."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
        try:
            staged.rename(out_dir)
        except OSError:
            old.rename(out_dir)  # put the previous bundle back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(out_dir)
