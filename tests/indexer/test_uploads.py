"""indexer.uploads: which photos in uploads/ the versions refer to, and which may go."""
from __future__ import annotations

import os
import time

from indexer.build import update_index
from indexer.layout import IndexLayout
from indexer.uploads import StoredUpload, clean_uploads, referenced_uploads
from tests.support.indexes import FixtureEncoder, build_fixture_index
from tests.support.service import jpeg_bytes
from vitrine.catalog.product import FileImage, Product


def test_only_unreferenced_photos_go_old_ones_or_a_writers_own_unless_stored_again(tmp_path):
    layout = IndexLayout(build_fixture_index(tmp_path, n=8).index_dir)
    kept = layout.store_upload(jpeg_bytes((200, 30, 30)), "jpg")
    update_index(layout.root, upserts=[Product(id="u1", title="Red zebra", images=(FileImage(kept),))],
                 encoder=FixtureEncoder(), strict=True, threads=1)  # fmt: skip
    failed = StoredUpload.of(layout.store_upload(jpeg_bytes((40, 140, 60)), "jpg"))  # its write failed
    again = StoredUpload.of(layout.store_upload(jpeg_bytes((40, 90, 200)), "jpg"))  # failed, but stored again since
    time.sleep(0.01)
    layout.store_upload(jpeg_bytes((40, 90, 200)), "jpg")
    old_orphan = layout.uploads / "0ld.png"
    old_orphan.write_bytes(b"x")
    os.utime(old_orphan, (time.time() - 7200, time.time() - 7200))
    young_orphan = layout.uploads / "young.png"
    young_orphan.write_bytes(b"y")

    cache: dict[str, frozenset[str]] = {}
    assert referenced_uploads(layout, cache) == {kept.name}
    with layout.lock():
        removed = clean_uploads(layout, min_age_s=3600, own=[failed, again], cache=cache)
    assert {path.name for path, _ in removed} == {failed.path.name, old_orphan.name}
    assert {p.name for p in layout.uploads.iterdir()} == {kept.name, again.path.name, young_orphan.name}
    os.utime(kept, (time.time() - 7200, time.time() - 7200))
    with layout.lock():  # a referenced photo stays, however old, even named as one's own
        removed = clean_uploads(layout, min_age_s=0, own=[StoredUpload.of(kept)], cache=cache)
    assert {path.name for path, _ in removed} == {again.path.name, young_orphan.name}
    assert [p.name for p in layout.uploads.iterdir()] == [kept.name]


def test_vitrine_index_gc_removes_old_unreferenced_uploads(tmp_path, capsys):
    from tests.indexer.test_indexer_versions import run_index

    layout = IndexLayout(build_fixture_index(tmp_path, n=8).index_dir)
    old = layout.store_upload(jpeg_bytes((1, 2, 3)), "jpg")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    young = layout.store_upload(jpeg_bytes((4, 5, 6)), "jpg")
    assert run_index(["--gc", "--out", str(layout.root)]) == 0
    assert f"removed {old}" in capsys.readouterr().out
    assert [p.name for p in layout.uploads.iterdir()] == [young.name]
