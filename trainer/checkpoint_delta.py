"""A checkpoint's trained tensors only, so a run made on a remote GPU machine comes home small.

A cached-token run trains the heads and the unlocked top of each tower; everything below the cache boundary
keeps the pretrained weights, which the model factory rebuilds anywhere. `write_delta` keeps the tensors that
differ from a freshly built model (plus the checkpoint's metadata, without the optimizer), split into files
of at most `max_bytes`; `restore` rebuilds the full checkpoint that `vitrine export` reads.

    python3 -m trainer.checkpoint_delta write runs/x/best.pt out/ --max-mb 15   # on the GPU machine
    python3 -m trainer.checkpoint_delta restore out/best.delta-*.pt runs/x/best.pt   # at home
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from trainer.factory import create_model
from trainer.train import seed_everything

DROPPED = ("optimizer", "scheduler")  # resuming needs them; exporting and evaluating do not


def fresh_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The state of the model the checkpoint's run started from (same config, pretrained towers)."""
    seed_everything(int(ckpt.get("config", {}).get("seed", 0)))  # untrained heads as the run drew them
    model = create_model(ckpt["model_name"], ckpt.get("pretrained"), pruning=ckpt.get("pruning", False),
                         **ckpt.get("model_overrides", {}))  # fmt: skip
    return model.state_dict()


def write_delta(checkpoint: Path, out: Path, *, max_bytes: int = 15 << 20, stem: str = "best") -> list[Path]:
    """Files `out/<stem>.delta-<i>.pt`: the changed tensors (float32 as trained), metadata in the first."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    base = fresh_state(ckpt)
    state = ckpt["state_dict"]
    if set(state) != set(base):
        raise ValueError(f"{checkpoint}: its tensors are not the model config's ({len(state)} vs {len(base)} keys)")
    changed: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # a tied tensor (two module paths, one storage) travels once
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        if torch.equal(tensor, base[key]):
            continue
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if where in seen:
            aliases[key] = seen[where]
        else:
            seen[where] = key
            changed[key] = tensor
    meta = {k: v for k, v in ckpt.items() if k not in (*DROPPED, "state_dict")}
    chunks: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in changed.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > max_bytes:
            raise ValueError(f"{key} alone takes {nbytes} bytes, more than max_bytes={max_bytes}")
        if size + nbytes > max_bytes:
            chunks.append({})
            size = 0
        chunks[-1][key] = tensor.contiguous()
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(chunks):
        path = out / f"{stem}.delta-{i}.pt"
        torch.save({"meta": meta if i == 0 else None, "aliases": aliases if i == 0 else None, "chunk": i,
                    "chunks": len(chunks), "tensors": chunk}, path)  # fmt: skip
        paths.append(path)
    return paths


def restore(parts: Sequence[Path], out: Path) -> Path:
    """The full checkpoint from `write_delta`'s files: the fresh model's state with the trained tensors on top."""
    loaded = sorted((torch.load(p, map_location="cpu", weights_only=False) for p in parts), key=lambda d: d["chunk"])
    if not loaded or [d["chunk"] for d in loaded] != list(range(loaded[0]["chunks"])):
        raise ValueError(f"need every chunk of one delta, got {[str(p) for p in parts]}")
    meta = loaded[0]["meta"]
    state = fresh_state(meta)
    for part in loaded:
        unknown = set(part["tensors"]) - set(state)
        if unknown:
            raise ValueError(f"the delta has tensors the model lacks: {sorted(unknown)[:5]}")
        state.update(part["tensors"])
    for alias, key in loaded[0]["aliases"].items():
        state[alias] = state[key]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**meta, "state_dict": state}, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    w = sub.add_parser("write", help="a checkpoint's trained tensors, in files of at most --max-mb")
    w.add_argument("checkpoint", type=Path)
    w.add_argument("out", type=Path)
    w.add_argument("--max-mb", type=float, default=15.0)
    w.add_argument("--stem", default="best")
    r = sub.add_parser("restore", help="the full checkpoint from a delta's files")
    r.add_argument("parts", type=Path, nargs="+")
    r.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    if args.verb == "write":
        for path in write_delta(args.checkpoint, args.out, max_bytes=int(args.max_mb * (1 << 20)), stem=args.stem):
            print(path, path.stat().st_size)
    else:
        print(restore(args.parts, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
