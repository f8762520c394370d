"""`vitrine rerank train|export|eval`: the reranker's training stages, bundle export and evaluation."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from vitrine.cliargs import non_negative_int, positive_float, positive_int
from vitrine.errors import UserError

log = logging.getLogger(__name__)
# Prior weights to sweep: 0 is the cross-encoder alone, 1e4 the first stage's order in practice.
PRIOR_GRID = (0.0, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0, 1e4)


def _splits(catalog: str, *splits: str) -> list[list]:
    """The products of each named split, reading the catalog once."""
    from vitrine.catalog.registry import read_catalog

    products = read_catalog(catalog).products
    out = [[p for p in products if p.split == split] for split in splits]
    for split, chosen in zip(splits, out):
        if not chosen:
            raise UserError(f"{catalog}: no products in split {split!r}")
    return out


def _features(bundle: str, products, cache: str):
    from trainer.patches import bundle_product_features

    return bundle_product_features(bundle, products, cache)


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.concepts import ConceptGraph
    from trainer.cross_encoder.data import DualEmbeddings, QueryMaker
    from trainer.cross_encoder.knowledge import AttributeSchema
    from trainer.cross_encoder.mining import mine_groups, tia_hard_negatives
    from trainer.cross_encoder.train import RerankerTrainConfig, RerankerTrainer
    from vitrine.runtime.bundle import load_bundle

    cfg = RerankerTrainConfig(
        stage=args.stage, out_dir=args.out, model=args.model, init=args.init, knowledge=not args.no_knowledge,
        steps=args.steps, batch_size=args.batch_size, groups_per_step=args.groups_per_step, negatives=args.negatives,
        negative_pool=args.negative_pool,
        student_layers=args.student_layers, hidden_distill=args.hidden_distill, lr=args.lr, seed=args.seed, threads=args.threads, prior_init=args.prior_init,
        head_lr=args.head_lr, residual_head=args.residual_head, protocol_groups=args.protocol_groups, amp=args.amp,
    )
    if args.project_patches and cfg.stage != "pretrain":
        raise UserError("--project-patches builds a new cross-encoder: use it with --stage pretrain")
    (products,) = _splits(args.catalog, "train")
    feats = _features(args.bundle, products, args.cache)
    schema = AttributeSchema.from_products(products)
    bundle = load_bundle(args.bundle)
    dual = DualEmbeddings(feats.text, feats.image, bundle.encode_texts)
    hard = None
    if cfg.stage == "pretrain" and args.hard_negatives:
        hard = tia_hard_negatives([p.title for p in products], feats.text, feats.image, k=args.hard_negatives)
    groups = None
    if cfg.stage != "pretrain":
        graph = ConceptGraph.build(products)
        visual = frozenset(w for c in graph.concepts for w in c.split())
        maker = QueryMaker(graph.brand_words, visual)
        # Groups are drawn from --seed: give distillation another seed than fine-tuning for fresh queries.
        groups = mine_groups(
            products, feats.text, feats.image, bundle.encode_texts, maker, schema,
            count=cfg.steps * cfg.groups_per_step, alpha_t2p=bundle.alphas.for_kind("text"), negatives=cfg.negatives,
            pool=cfg.negative_pool, title_drop=cfg.title_drop, knowledge=cfg.knowledge, seed=cfg.seed, protocol=cfg.protocol_groups,
        )
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.out_dir) / "groups.jsonl", "w") as fh:
            for g in groups:
                fh.write(json.dumps({"query": g.query, "positive": products[g.positive].id, "negatives": [products[j].id for j in g.negatives],
                                     "with_titles": g.with_titles, "swapped_query": g.swapped_query}) + "\n")
    source_grid = bundle.patch_spec.grid if bundle.patch_spec is not None else None
    dual_model = None
    if args.project_patches:
        from trainer.cross_encoder.factory import dual_encoder_of_bundle

        try:
            dual_model = dual_encoder_of_bundle(args.bundle)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    trainer = RerankerTrainer(cfg, products, feats.patches, groups=groups, schema=schema, dual=dual, hard=hard,
                              source_grid=source_grid, project_patches_with=dual_model)
    summary = trainer.run()
    print(json.dumps(summary, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.cross_encoder.export import export_reranker, export_reranker_copy

    kw = dict(default_top_n=args.top_n, quantize=args.quantize, max_query_tokens=args.max_query_tokens,
              max_title_tokens=args.max_title_tokens)  # fmt: skip
    try:
        if args.out:
            spec = export_reranker_copy(args.checkpoint, args.bundle, args.out, **kw)
        else:
            spec = export_reranker(args.checkpoint, args.bundle, **kw)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    print(json.dumps(spec.model_dump(mode="json"), indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from trainer.cross_encoder.knowledge import AttributeSchema
    from vitrine.evaluation.rerank import RerankEvaluator
    from vitrine.runtime.bundle import load_bundle
    from vitrine.runtime.manifest import read_manifest
    from vitrine.runtime.reranker import load_reranker

    if args.write_prior and not args.tune_prior:
        raise UserError("--write-prior needs --tune-prior")
    if args.write_prior and args.split == "test":
        raise UserError("tune the prior weight on val, not on test")
    products, train = _splits(args.catalog, args.split, "train")
    feats = _features(args.features_bundle or args.bundle, products, args.cache)
    bundle = load_bundle(args.features_bundle or args.bundle)
    reranker = load_reranker(args.bundle, read_manifest(args.bundle), threads=args.threads)
    if reranker is None:
        raise UserError(f"bundle {args.bundle} carries no reranker; add one with `vitrine rerank export`")
    schema = AttributeSchema.from_products(train)
    rng = np.random.default_rng([args.seed, 31])
    grid = PRIOR_GRID if args.tune_prior else ()
    evaluator = RerankEvaluator(top_n=args.top_n, num_queries=args.num_queries, t2p_queries=args.t2p_queries,
                                alpha_t2p=bundle.alphas.for_kind("text"), seed=args.seed, prior_grid=grid)
    swap = lambda title: schema.swap(title, rng)  # noqa: E731
    photos = None
    if args.i2p_queries:
        from vitrine.evaluation.encoder import encode_images
        from vitrine.evaluation.photos import i2p_query_products, shopper_photo, shopper_photo_rng

        targets = i2p_query_products(len(products), args.i2p_queries, args.seed)
        photo_embs = encode_images(bundle, [products[t].image for t in targets], progress=False,
                                   transform=lambda i, im: shopper_photo(im, shopper_photo_rng(args.seed, int(targets[i]))))
        photos = (photo_embs, targets, bundle.alphas.for_kind("image"))
    report = evaluator(reranker, products, feats.text, feats.image, np.asarray(feats.patches), bundle.encode_texts, swap=swap, photos=photos)
    report["bundle"], report["split"] = str(args.bundle), args.split
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tune_prior:
        from trainer.cross_encoder.export import set_reranker_prior_weight
        from vitrine.evaluation.rerank import best_prior_weight

        best = best_prior_weight(report["prior_sweep"])
        report["prior_sweep"]["best"] = best
        if args.write_prior:
            set_reranker_prior_weight(args.bundle, best, source={"split": args.split, "objective": "t2i R@1 + t2p nDCG@10",
                                                                 "queries": args.num_queries, "t2p_queries": args.t2p_queries})
            report["prior_sweep"]["written_to"] = str(args.bundle)
    (out / "rerank.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("rerank", help="train, export and evaluate the cross-encoder reranker")
    sub = parser.add_subparsers(dest="rerank_command", required=True)

    train = sub.add_parser("train", help="one training stage: pretrain, finetune or distill")
    train.add_argument("--stage", required=True, choices=("pretrain", "finetune", "distill"))
    train.add_argument("--bundle", required=True, help="dual-encoder bundle with patch features (hard negatives, patches)")
    train.add_argument("--catalog", required=True)
    train.add_argument("--out", required=True)
    train.add_argument("--model", default="minilm-l6-aligned", help="cross-encoder config (pretrain)")
    train.add_argument("--init", help="checkpoint to start from (finetune: pretrained; distill: teacher)")
    train.add_argument("--no-knowledge", action="store_true", help="FashionBERT without KG-MLIM / KG-ITM (ablation)")
    train.add_argument("--steps", type=positive_int, default=300)
    train.add_argument("--batch-size", type=positive_int, default=24)
    train.add_argument("--groups-per-step", type=positive_int, default=4)
    train.add_argument("--negatives", type=positive_int, default=7)
    train.add_argument("--negative-pool", type=positive_int, default=20,
                       help="finetune/distill: negatives are drawn from the dual encoder's top N wrong products")
    train.add_argument("--hard-negatives", type=non_negative_int, default=10,
                       help="pretrain: TIA negatives from the dual encoder's top K wrong images / titles (0: swaps and random texts only)")
    train.add_argument("--student-layers", type=positive_int, default=2)
    train.add_argument("--hidden-distill", type=float, default=0.0,
                       help="distill: weight of the hidden-state MSE (TinyBERT layer mapping); 0: scores only")
    train.add_argument("--lr", type=positive_float, default=5e-5)
    train.add_argument("--prior-init", type=float, default=20.0,
                       help="finetune: starting weight of the first-stage score added to the match logit (0 with --prior-lr 0: cross-encoder alone)")
    train.add_argument("--project-patches", action="store_true",
                       help="pretrain: patches enter through the dual encoder's trained image head, frozen "
                            "(needs the checkpoint the bundle's manifest names)")
    train.add_argument("--head-lr", type=positive_float,
                       help="finetune: learning rate of the [CLS] match head (default: that of the other new parts, 5e-4)")
    train.add_argument("--residual-head", action="store_true",
                       help="finetune: zero the match head's output layer so training starts at the first stage's ranking")
    train.add_argument("--protocol-groups", action="store_true",
                       help="finetune/distill: title queries against images alone and shopper queries against titled products, "
                            "as the sample T2I and T2P protocols draw them (default: title, visual and shopper queries, titles dropped at random)")
    train.add_argument("--amp", choices=("auto", "cuda", "bf16", "off"), default="cuda",
                       help="bf16 autocast of the forward. auto: on CPUs with native bf16 (AVX512-BF16/AMX); "
                            "cuda (default): never here, the reranker trains on the CPU; bf16: always")
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--threads", type=positive_int)
    train.add_argument("--cache", default="runs/cache")
    train.set_defaults(func=cmd_train)

    export = sub.add_parser("export", help="add a trained reranker to a model bundle (ONNX, VSL, parity-checked)")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--bundle", required=True)
    export.add_argument("--out", help="write a copy of the bundle with the reranker here instead of changing --bundle")
    export.add_argument("--top-n", type=positive_int, default=20, help="the service's default rerank depth")
    export.add_argument("--quantize", choices=("int8",), help="ship a dynamically quantized graph (faster on CPU)")
    export.add_argument("--max-query-tokens", type=positive_int, help="cap the query's tokens a row (default: as trained)")
    export.add_argument("--max-title-tokens", type=positive_int, help="cap the title's tokens a row (default: as trained)")
    export.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="sample-protocol T2I and T2P with and without reranking; TIA accuracy/AUC")
    ev.add_argument("--bundle", required=True, help="bundle carrying the reranker")
    ev.add_argument("--features-bundle", help="bundle whose cached features to use (default: --bundle)")
    ev.add_argument("--catalog", required=True)
    ev.add_argument("--split", default="test")
    ev.add_argument("--top-n", type=positive_int, default=20)
    ev.add_argument("--num-queries", type=positive_int, default=1000)
    ev.add_argument("--t2p-queries", type=positive_int, default=500)
    ev.add_argument("--i2p-queries", type=non_negative_int, default=0,
                    help="also rerank this many shopper-photo queries (I2P; the photo's embedding in the query slot)")
    ev.add_argument("--tune-prior", action="store_true", help="also sweep the first-stage prior weight over a grid")
    ev.add_argument("--write-prior", action="store_true", help="with --tune-prior: write the best weight into --bundle")
    ev.add_argument("--seed", type=non_negative_int, default=0)
    ev.add_argument("--threads", type=positive_int, default=2)
    ev.add_argument("--cache", default="runs/cache")
    ev.add_argument("--out", required=True)
    ev.set_defaults(func=cmd_eval)
