"""`vitrine train` and `vitrine export`. Torch is imported only when a command runs."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from vitrine.cliargs import (
    layer_count,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    unit_interval,
)
from vitrine.errors import UserError

# Picked on val (docs/RESULTS.md, issue 11): the residual head at 10 epochs beats the plain one at 30;
# reading the photo's pooled conv-head features in the image residual adds 3.4 T2P nDCG@10 (3 seeds); and
# training the conv head, the last block stage and the top 2 MiniLM layers above the cache adds 1.8 sample
# T2I R@1 and 0.8 T2P on val (3 seeds), +1.8 / +1.9 on test, at about 3x the training time.
DEFAULT_MODEL = "fashion-lite-apu"
TOKEN_HEAD_EPOCHS = 10


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a dual encoder on a catalog (cached-token recipe; or ITC, FashionKLIP CVA, MML-TP pruning)",
        description=(
            "Train text and image encoders into one space on the catalog's train split, keeping the best "
            "epoch on val and tuning alpha per query kind on val. Models with attention heads (the default "
            "fashion-lite-apu, fashion-lite-apc, fashion-lite-apr, fashion-lite-ap) use the cached-token recipe: the frozen towers run once, their token states are "
            "cached, and the heads train for many epochs (--no-multi-positive, --attr-weight, --hard-negatives, "
            "--image-views, --cva, --prune, and unlocking above the cache: --image-unlocked-groups, "
            "--text-unlocked-layers). Other models (fashion-lite, open_clip names) train projections or unlocked layers "
            "(--text-unlocked-layers, --image-unlocked-groups, --cva, --prune). The cached-token recipe also runs "
            "data-parallel under torchrun: torchrun --nproc_per_node N -m vitrine.cli train ... (README, Scaling out)."
        ),
    )
    p.add_argument("--catalog", required=True, help="catalog path (JSONL, Kaggle styles.csv folder, Fashion-Gen .h5)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, summary.json); resumes if present")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry config (fashion-lite-apu, the default: fashion-lite-apc with the conv head, the last block stage "
                        "and the top 2 MiniLM layers trained above the cache (its recipe_cfg); fashion-lite-apc: attention heads over cached towers, with a linear "
                        "residual from the mean text tokens and the photo's pooled conv-head features; fashion-lite-apr: the "
                        "image residual from the mean block map; fashion-lite-ap: without residuals; fashion-lite: pooled towers with "
                        "CVA/MML-TP/unlocking; tiny, tiny-ap) or an open_clip model name")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag, or 'none' for random init")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"epochs (default: the model config's recipe_cfg, else {TOKEN_HEAD_EPOCHS} for attention-head models, "
                        "whose towers are cached, else 5)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="the global batch: under torchrun each of the N processes trains on 1/N of it")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="lr of projection heads and logit scale")
    p.add_argument("--text-lr", type=positive_float, default=None,
                   help="lr of unlocked text-tower layers (default: the model config's recipe_cfg, else 3e-5)")
    p.add_argument("--text-unlocked-layers", type=layer_count, default=None,
                   help="0 freezes the text tower, -1 trains all layers (default: the model config's recipe_cfg, else 0)")
    p.add_argument("--image-unlocked-groups", type=non_negative_int, default=None,
                   help="train the image tower's last N timm groups (1: the conv head, 2: + the last block stage, ...); "
                        "the attention-head recipe caches below them, the pooled recipe runs without a feature cache "
                        "(default: the model config's recipe_cfg, else 0)")
    p.add_argument("--image-lr", type=positive_float, default=None,
                   help="attention-head recipe: lr of unlocked image groups (default: the model config's recipe_cfg, else 1e-4)")
    p.add_argument("--image-summary", choices=("blocks", "conv_head"), default=None,
                   help="attention-head recipe: what the image head's residual path reads: the mean of the block map "
                        "(the config's default) or the pooled conv-head features")
    p.add_argument("--cva", action="store_true", help="add FashionKLIP's concept-visual alignment loss")
    p.add_argument("--cva-weight", type=non_negative_float, default=1.0,
                   help="attention-head recipe: L = L_ITC + w L_CVA (the pooled recipe uses the paper's ½(L_ITC + L_CVA))")
    p.add_argument("--cva-warmup", type=non_negative_int, default=0,
                   help="attention-head recipe: epochs of ITC alone before CVA starts")
    p.add_argument("--cva-topk", type=positive_int, default=32)
    p.add_argument("--cva-prototypes", type=positive_int, default=4, help="visual prototypes kept per concept by MMR")
    p.add_argument("--concept-min-count", type=positive_int, default=5)
    p.add_argument("--prune", action="store_true", help="MML-TP token pruning in the text tower")
    p.add_argument("--prune-weight", type=non_negative_float, default=0.1)
    p.add_argument("--prune-temperature", type=positive_float, default=None,
                   help="attention-head recipe: temperature T of the gates (default: the model config's)")
    p.add_argument("--prune-quantile", type=unit_interval, default=0.1,
                   help="attention-head recipe: τ starts at this quantile of each trained layer's token importance")
    p.add_argument("--no-multi-positive", action="store_true",
                   help="attention-head recipe: plain InfoNCE instead of identical titles as positives")
    p.add_argument("--attr-weight", type=non_negative_float, default=0.0,
                   help="attention-head recipe: weight of the attribute heads (baseColour, articleType, gender, usage, season)")
    p.add_argument("--hard-negatives", type=unit_interval, default=0.0,
                   help="attention-head recipe: share of each batch drawn in same-article-type groups")
    p.add_argument("--query-weight", type=non_negative_float, default=None,
                   help="attention-head recipe: weight of the shopper-query loss, queries spelled from each training "
                        "product's attributes (default: the model config's recipe_cfg, else 0: off)")
    p.add_argument("--val-every", type=positive_int, default=5, help="attention-head recipe: epochs between validations")
    p.add_argument("--image-views", type=positive_int, default=None,
                   help="attention-head recipe: cached views per training photo (more: augmented re-shoots, cached once; "
                        "default: the model config's recipe_cfg, else 1)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--amp", choices=["auto", "cuda", "bf16", "off"], default=None,
                   help="attention-head recipe: bf16 autocast. auto: on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX); "
                        "cuda: on CUDA only; default: the model config's recipe_cfg, else cuda")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N products of each split")
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None)
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "export",
        help="export a trained checkpoint to a model bundle (ONNX encoders + tokenizer + manifest)",
        description="Write a model bundle the torch-free side loads with onnxruntime; parity with torch is checked.",
    )
    e.add_argument("--checkpoint", required=True, help="a run's best.pt (or a run directory)")
    e.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")
    e.add_argument("--catalog", default=None, help="catalog whose val titles/photos are used for the parity check")
    e.add_argument("--prune-at-inference", choices=("auto", "on", "off"), default="auto",
                   help="keep MML-TP gates at inference (auto: what validation decided)")
    e.set_defaults(func=run_export)


def resolve_unlocking(model: str, text_layers: int | None, image_groups: int | None) -> tuple[int, int]:
    """(text layers, image groups) to train: flags given on the command line win over the model
    config's `recipe_cfg`; neither: 0 (frozen)."""
    from trainer.factory import recipe_defaults

    defaults = recipe_defaults(model)
    return (
        defaults.get("text_unlocked_layers", 0) if text_layers is None else text_layers,
        defaults.get("image_unlocked_groups", 0) if image_groups is None else image_groups,
    )


def resolve_tower_lrs(model: str, text_lr: float | None, image_lr: float | None) -> tuple[float, float]:
    """(text lr, image lr) of the unlocked tower parts: flags win over the model config's `recipe_cfg`,
    then TrainConfig's defaults."""
    from trainer.factory import recipe_defaults
    from trainer.train import TrainConfig

    defaults = recipe_defaults(model)
    return (
        float(defaults.get("text_lr", TrainConfig.text_lr)) if text_lr is None else text_lr,
        float(defaults.get("image_lr", TrainConfig.image_lr)) if image_lr is None else image_lr,
    )


def resolve_query_weight(model: str, weight: float | None) -> float:
    """The shopper-query loss weight: the flag, else the model config's `recipe_cfg`, else 0 (off)."""
    from trainer.factory import recipe_defaults

    return float(recipe_defaults(model).get("query_weight", 0.0)) if weight is None else weight


def resolve_recipe_options(model: str, epochs: int | None, image_views: int | None, amp: str | None) -> tuple[int, int, str]:
    """Epochs, cached views per photo and autocast mode: each flag, else the model config's `recipe_cfg`, else the
    recipe's fallback (10 epochs for attention-head models, else 5; 1 view; bf16 on CUDA only)."""
    from trainer.factory import has_token_heads, recipe_defaults

    cfg = recipe_defaults(model)
    fallback_epochs = TOKEN_HEAD_EPOCHS if has_token_heads(model) else 5
    return (epochs or int(cfg.get("epochs", fallback_epochs)), image_views or int(cfg.get("image_views", 1)),
            amp or str(cfg.get("amp", "cuda")))  # fmt: skip


def run_train(args: argparse.Namespace) -> int:
    from trainer.distributed import Distributed
    from trainer.train import TrainConfig, train

    if not Distributed.from_env().is_main:  # under torchrun, rank 0 speaks for the run
        for name in ("trainer", "vitrine"):
            logging.getLogger(name).setLevel(logging.WARNING)

    epochs, image_views, amp = resolve_recipe_options(args.model, args.epochs, args.image_views, args.amp)
    text_unlocked, image_unlocked = resolve_unlocking(args.model, args.text_unlocked_layers, args.image_unlocked_groups)
    text_lr, image_lr = resolve_tower_lrs(args.model, args.text_lr, args.image_lr)
    query_weight = resolve_query_weight(args.model, args.query_weight)
    config = TrainConfig(
        catalog=args.catalog, out=args.out, model=args.model, pretrained=args.pretrained, epochs=epochs,
        batch_size=args.batch_size, lr=args.lr, text_lr=text_lr, image_lr=image_lr,
        text_unlocked_layers=text_unlocked,
        model_overrides={"heads_cfg": {"image_summary": args.image_summary}} if args.image_summary else {},
        image_unlocked_groups=image_unlocked, cva=args.cva, cva_topk=args.cva_topk,
        cva_prototypes=args.cva_prototypes, cva_weight=args.cva_weight, cva_warmup=args.cva_warmup,
        concept_min_count=args.concept_min_count, prune=args.prune,
        prune_weight=args.prune_weight, prune_temperature=args.prune_temperature, prune_quantile=args.prune_quantile,
        seed=args.seed, device=args.device, amp=amp, limit=args.limit,
        max_steps_per_epoch=args.max_steps_per_epoch, cache_dir=args.cache_dir, resume=not args.no_resume,
        multi_positive=not args.no_multi_positive, attr_weight=args.attr_weight, hard_negatives=args.hard_negatives,
        val_every=args.val_every, image_views=image_views, query_weight=query_weight,
        progress=not args.no_progress,
    )
    summary = train(config)
    if not summary:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    print(json.dumps({"out": args.out, "val": summary["val"], "alpha": summary["alpha"]["alpha"],
                      "train_seconds": round(summary["train_seconds"], 1)}, indent=2))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from trainer.bundle import export_checkpoint

    ckpt = Path(args.checkpoint)
    if ckpt.is_dir():
        ckpt = ckpt / "best.pt"
    if not ckpt.is_file():
        raise UserError(f"checkpoint not found: {ckpt}")
    prune = {"auto": None, "on": True, "off": False}[args.prune_at_inference]
    bundle = export_checkpoint(ckpt, Path(args.out), catalog=args.catalog, prune_at_inference=prune)
    print(f"bundle written to {bundle}")
    return 0
