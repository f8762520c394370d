"""The reranker's pieces on fixed inputs: Eq. 6 weights, KG-MLIM / KG-ITM, whole-word masking, row
building, VSL parity (torch and ONNX), tiny training stages and the rerank evaluator."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from trainer.cross_encoder.factory import create_cross_encoder, get_cross_encoder_config, get_pair_encoder, load_cross_encoder
from trainer.cross_encoder.knowledge import AttributeSchema, norm_word
from trainer.cross_encoder.loss import AdaptiveLoss, adaptive_task_weights
from trainer.cross_encoder.masking import IGNORE_INDEX, choose_mask_words, mask_patches, mask_words
from vitrine.catalog.product import BytesImage, Product
from vitrine.evaluation.rerank import RerankEvaluator, best_prior_weight, binary_auc, reranked_rank

pytestmark = pytest.mark.torch  # needs the train extra

SCHEMA = AttributeSchema({
    "baseColour": ["Blue", "Red", "Navy Blue", "NA"],
    "articleType": ["Tshirts", "Flip Flops", "Sandals"],
    "gender": ["Men", "Women"],
    "usage": ["Casual"],
    "season": ["Summer"],
})


# ------------------------------------------------------------------ Eq. 6


def eq5_objective(w: np.ndarray, sq: np.ndarray) -> float:
    """FashionBERT Eq. 5 with orthogonal task gradients: 1/2 sum w_i^2 |g_i|^2 + 1/2 sum (w_i - 1/L)^2."""
    return 0.5 * float((w**2 * sq).sum()) + 0.5 * float(((w - 1 / len(w)) ** 2).sum())


def test_adaptive_weights_known_gradient_norms():
    w = adaptive_task_weights(torch.tensor([1.0, 3.0, 0.0]))
    expected = np.array([1 / 2, 1 / 4, 1.0]) / 1.75
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(adaptive_task_weights(torch.tensor([2.0, 2.0, 2.0])).numpy(), [1 / 3] * 3, rtol=1e-6)
    assert float(w.sum()) == pytest.approx(1.0)


def test_adaptive_weights_minimise_eq5_on_the_simplex():
    sq = np.array([0.5, 4.0, 9.0])
    w = adaptive_task_weights(torch.tensor(sq)).numpy()
    best = eq5_objective(w, sq)
    grid = np.linspace(0, 1, 101)
    for a, b in itertools.product(grid, grid):
        if a + b <= 1:
            assert eq5_objective(np.array([a, b, 1 - a - b]), sq) >= best - 1e-9


def test_adaptive_weights_reject_bad_norms():
    with pytest.raises(ValueError):
        adaptive_task_weights(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError):
        adaptive_task_weights(torch.tensor([]))


def test_adaptive_loss_reads_task_gradients_on_shared_parameters():
    shared = torch.nn.Parameter(torch.zeros(2))
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    losses = {"mlm": (a * shared).sum() + 1.0, "tia": (b * shared).sum()}
    total, weights, sq = AdaptiveLoss([shared])(losses)
    assert sq == pytest.approx({"mlm": 25.0, "tia": 1.0})
    assert weights["mlm"] == pytest.approx((1 / 26) / (1 / 26 + 1 / 2))
    assert float(total.detach()) == pytest.approx(weights["mlm"] * 1.0)
    total.backward()
    np.testing.assert_allclose(shared.grad.numpy(), (weights["mlm"] * a + weights["tia"] * b).numpy(), rtol=1e-6)


# ------------------------------------------------------------------ KG-FLIP


def test_attribute_mentions_on_fixed_titles():
    found = SCHEMA.find("Nike Men Navy Blue T-Shirts")
    assert [(m.field, m.value, m.start, m.end) for m in found] == [
        ("gender", "Men", 1, 2), ("baseColour", "Navy Blue", 2, 4), ("articleType", "Tshirts", 4, 5),
    ]
    assert SCHEMA.attribute_words("Puma Women Flip Flops") == [1, 2, 3]
    assert SCHEMA.attribute_words("Titan Analog Watch") == []
    assert "NA" not in SCHEMA.values["baseColour"]
    assert norm_word("T-Shirts,") == "tshirt"


def test_kg_mlim_masks_attribute_words_first():
    rng = np.random.default_rng(0)
    title = "Nike Men Blue Tshirts"  # 4 words: a budget of one word
    attrs = SCHEMA.attribute_words(title)
    for _ in range(50):
        chosen = choose_mask_words(4, rng, priority_words=attrs)
        assert len(chosen) == 1 and chosen[0] in attrs
    long_title = "Roadster Fast and Furious Graphic Print Round Neck Tee Blue"  # 10 words, one attribute
    attrs = SCHEMA.attribute_words(long_title)
    assert attrs == [9]
    for _ in range(20):
        chosen = choose_mask_words(10, rng, priority_words=attrs)
        assert len(chosen) == 2 and 9 in chosen  # the attribute, then one random word up to 15 %
    plain = [choose_mask_words(10, rng) for _ in range(200)]
    assert sum(9 in c for c in plain) < 100  # without knowledge the attribute word is not favoured


def test_kg_itm_swaps_one_attribute_for_another_value():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(100):
        swapped = SCHEMA.swap("Nike Men Blue Sandals", rng)
        seen.add(swapped)
        before, after = "Nike Men Blue Sandals".split(), swapped.split()
        changed = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
        assert swapped != "Nike Men Blue Sandals"
        assert len(after) != len(before) or len(changed) == 1
    assert "Nike Women Blue Sandals" in seen and "Nike Men Red Sandals" in seen and "Nike Men Blue Flip Flops" in seen
    assert "Nike Men Blue Tshirts" in seen
    assert SCHEMA.swap("Titan Analog Watch", rng) is None


# ------------------------------------------------------------------ masking


def test_whole_word_masking_masks_every_piece_of_a_word():
    encoder = get_pair_encoder(get_cross_encoder_config("tiny"))
    row = encoder.row("Nike superlightweight tshirts")
    pieces = row.word_ids
    assert (pieces == 1).sum() > 1  # the long word is several word pieces
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(60):
        ids, labels = mask_words(row.input_ids, row.word_ids, [1], rng, mask_id=encoder.mask_id, vocab_size=encoder.vocab_size)
        target = pieces == 1
        assert (labels[target] == row.input_ids[target]).all() and (labels[~target] == IGNORE_INDEX).all()
        assert (ids[~target] == row.input_ids[~target]).all()
        masked = ids[target] == encoder.mask_id
        assert masked.all() or not masked.any()  # never half a word
        outcomes.add("mask" if masked.all() else "keep" if (ids[target] == row.input_ids[target]).all() else "random")
    assert outcomes == {"mask", "keep", "random"}


def test_mpm_masks_ten_percent_of_patches():
    mask = mask_patches(49, np.random.default_rng(0))
    assert mask.dtype == bool and mask.sum() == 5
    assert mask_patches(4, np.random.default_rng(0)).sum() == 1


# ------------------------------------------------------------------ rows and VSL


def test_pair_rows_follow_cls_query_sep_title_sep():
    encoder = get_pair_encoder(get_cross_encoder_config("tiny"))
    row = encoder.row("red dress", "Nike Women Red Dress")
    ids = row.input_ids.tolist()
    assert ids[0] == encoder.cls_id and ids.count(encoder.sep_id) == 2 and ids[-1] == encoder.sep_id
    sep = ids.index(encoder.sep_id)
    assert (row.token_type_ids[: sep + 1] == 0).all() and (row.token_type_ids[sep + 1 :] == 1).all()
    empty = encoder.row("red dress")
    assert empty.input_ids.tolist() == ids[: sep + 1] + [encoder.sep_id]
    long = encoder.row("word " * 50, "title " * 50)
    assert len(long.input_ids) == encoder.max_text_tokens
    batch = encoder.batch(["a", "much longer query here"], ["", "t"])
    assert batch["input_ids"].shape[1] == len(encoder.row("much longer query here", "t").input_ids)
    assert batch["attention_mask"][0].sum() == 4  # [CLS] a [SEP] [SEP]
    with pytest.raises(ValueError):
        encoder.batch(["a"], ["b"], pad_to=2)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model, encoder = create_cross_encoder("tiny", pretrained=False, patch_grid=[2, 2], patch_dim=8)
    return model.eval(), encoder


def test_vsl_and_padded_rows_score_the_same(tiny_model):
    model, encoder = tiny_model
    queries, titles = ["red dress", "men black formal shoes for office", ""], ["Nike Women Red Dress", "", "Baggit Bag"]
    patches = torch.randn(3, 4, 8)
    vsl = {k: torch.from_numpy(v) for k, v in encoder.batch(queries, titles).items()}
    padded = {k: torch.from_numpy(v) for k, v in encoder.batch(queries, titles, pad_to=encoder.max_text_tokens).items()}
    assert padded["input_ids"].shape[1] > vsl["input_ids"].shape[1]
    with torch.no_grad():
        a, b = model.score(**vsl, patches=patches), model.score(**padded, patches=patches)
        single = torch.cat([model.score(**{k: torch.from_numpy(v) for k, v in encoder.batch([q], [t]).items()}, patches=patches[i : i + 1])
                            for i, (q, t) in enumerate(zip(queries, titles))])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, single, atol=1e-5, rtol=0)


def test_patch_positions_matter(tiny_model):
    model, encoder = tiny_model
    feeds = {k: torch.from_numpy(v) for k, v in encoder.batch(["red dress"], [""]).items()}
    patches = torch.randn(1, 4, 8)
    with torch.no_grad():
        a = model(**feeds, patches=patches)
        b = model(**feeds, patches=patches.flip(1))
    assert not torch.allclose(a[:, 0], b[:, 0])  # 2-D position embeddings tell the patches apart
    with pytest.raises(ValueError):
        model(**feeds, patches=torch.randn(1, 3, 8))


def test_student_starts_from_the_teachers_first_layers(tiny_model):
    model, _ = tiny_model
    student = model.truncated(1)
    assert student.num_layers == 1 and model.num_layers == 2
    for (name, p), (_, q) in zip(student.encoder.layer[0].state_dict().items(), model.encoder.layer[0].state_dict().items()):
        assert torch.equal(p, q), name
    assert student.config.num_layers == 1
    with pytest.raises(ValueError):
        model.truncated(3)


# ------------------------------------------------------------------ ONNX export


def test_reranker_onnx_vsl_matches_padded_torch(tmp_path):
    from tests.support.indexes import export_tiny_bundle
    from trainer.cross_encoder.export import export_reranker, export_reranker_copy
    from trainer.cross_encoder.factory import save_cross_encoder
    from vitrine.runtime import load_bundle, read_manifest
    from vitrine.runtime.reranker import load_reranker

    bundle = export_tiny_bundle(tmp_path / "bundle")
    torch.manual_seed(0)
    model, encoder = create_cross_encoder("tiny", pretrained=False)
    ckpt = save_cross_encoder(model, tmp_path / "ce.pt")
    with_reranker = tmp_path / "with-reranker"
    spec = export_reranker_copy(ckpt, bundle, with_reranker, default_top_n=10)
    assert spec.parity["max_abs_diff"] <= 1e-4 and spec.parity["vsl_text_length"] < spec.parity["padded_text_length"]
    assert read_manifest(bundle).model_extra.get("reranker") is None  # the source bundle is untouched
    load_bundle(with_reranker)  # every file, the reranker's included, matches its sha256
    reranker = load_reranker(with_reranker, read_manifest(with_reranker), threads=1)
    assert reranker.spec.default_top_n == 10 and reranker.layers == model.num_layers
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(4, 1, 64)).astype(np.float32)
    queries, titles = ["red dress", "black shoes for men", "bag", "watch"], ["Nike Red Dress", "", "A much longer title of a bag", ""]
    vsl = reranker.score_pairs(queries, titles, patches)
    padded = encoder.batch(queries, titles, pad_to=encoder.max_text_tokens)
    with torch.no_grad():
        ref = model.eval().score(**{k: torch.from_numpy(v) for k, v in padded.items()}, patches=torch.from_numpy(patches)).numpy()
    np.testing.assert_allclose(vsl, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(reranker.score_pairs(queries, titles, patches, pad_to=encoder.max_text_tokens), vsl, atol=1e-4, rtol=0)
    from vitrine.errors import UserError

    with pytest.raises(UserError):
        reranker.score_pairs(queries, titles, patches[:, :, :10])
    # A reranker reading other patches than the bundle gives is refused.
    other, _ = create_cross_encoder("tiny", pretrained=False, patch_dim=8)
    with pytest.raises(UserError):
        export_reranker(save_cross_encoder(other, tmp_path / "other.pt"), with_reranker)


def test_int8_reranker_export_ships_a_smaller_graph_with_close_scores(tmp_path):
    from tests.support.indexes import export_tiny_bundle
    from trainer.cross_encoder.export import export_reranker_copy
    from trainer.cross_encoder.factory import save_cross_encoder
    from vitrine.runtime import load_bundle, read_manifest
    from vitrine.runtime.reranker import load_reranker

    bundle = export_tiny_bundle(tmp_path / "bundle")
    torch.manual_seed(0)
    model, _ = create_cross_encoder("tiny", pretrained=False)
    ckpt = save_cross_encoder(model, tmp_path / "ce.pt")
    float_spec = export_reranker_copy(ckpt, bundle, tmp_path / "float")
    int8_spec = export_reranker_copy(ckpt, bundle, tmp_path / "int8", quantize="int8")
    assert float_spec.precision == "float32" and int8_spec.precision == "int8"
    assert int8_spec.parity["max_abs_diff"] <= 1e-4  # the float graph was checked before quantizing
    assert 0 < int8_spec.parity["int8_max_abs_diff_vs_torch"] < 0.05
    sizes = {name: (tmp_path / name / "reranker" / "reranker.onnx").stat().st_size for name in ("float", "int8")}
    assert sizes["int8"] < 0.6 * sizes["float"]
    load_bundle(tmp_path / "int8")  # hashes cover the quantized graph
    rerankers = {name: load_reranker(tmp_path / name, read_manifest(tmp_path / name), threads=1) for name in ("float", "int8")}
    rng = np.random.default_rng(1)
    patches = rng.normal(size=(3, 1, 64)).astype(np.float32)
    scores = {name: r.score("red dress", ["Nike Red Dress", "", "Puma Black Shoes"], patches) for name, r in rerankers.items()}
    np.testing.assert_allclose(scores["int8"], scores["float"], atol=0.05)
    with pytest.raises(ValueError):
        export_reranker_copy(ckpt, bundle, tmp_path / "fp16", quantize="fp16")

    # A prior weight tuned later rewrites only the manifest; the bundle still verifies.
    from trainer.cross_encoder.export import set_reranker_prior_weight

    set_reranker_prior_weight(tmp_path / "int8", 3.5, source={"split": "val"})
    load_bundle(tmp_path / "int8")
    tuned = load_reranker(tmp_path / "int8", read_manifest(tmp_path / "int8"), threads=1)
    assert tuned.prior_weight == 3.5 and tuned.spec.model_extra["prior_source"] == {"split": "val"}
    first = np.array([0.1, 0.2, 0.3], np.float32)
    np.testing.assert_allclose(tuned.score("red dress", ["a", "b", "c"], patches, first_stage=first),
                               tuned.score("red dress", ["a", "b", "c"], patches) + 3.5 * first, atol=1e-6)
    with pytest.raises(ValueError):
        set_reranker_prior_weight(tmp_path / "int8", -1.0)


# ------------------------------------------------------------------ training stages


def _products(n: int = 40) -> list[Product]:
    colours, arts = ["Red", "Blue", "Navy Blue", "Black"], ["Tshirts", "Sandals", "Flip Flops"]
    out = []
    for i in range(n):
        c, a, g = colours[i % 4], arts[i % 3], ["Men", "Women"][i % 2]
        out.append(Product(id=str(i), title=f"Brand{i % 5} {g} {c} {a}", images=(BytesImage(b"x"),), split="train",
                           attributes={"baseColour": c, "articleType": a, "gender": g, "usage": "Casual", "season": "Summer"}))
    return out


def test_tiny_training_stages_run_and_log(tmp_path):
    from trainer.cross_encoder.data import QueryMaker
    from trainer.cross_encoder.mining import mine_groups
    from trainer.cross_encoder.train import RerankerTrainConfig, RerankerTrainer

    products = _products()
    patches = np.random.default_rng(0).normal(size=(40, 1, 64)).astype(np.float16)
    pre = RerankerTrainer(RerankerTrainConfig(stage="pretrain", out_dir=str(tmp_path / "pre"), model="tiny", pretrained_backbone=False,
                                              steps=3, batch_size=8), products, patches, progress=False).run()
    assert set(pre["final_weights"]) == {"tia", "mlm", "mpm"} and sum(pre["final_weights"].values()) == pytest.approx(1.0)
    logged = [json.loads(line) for line in (tmp_path / "pre" / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and all(sum(r["weights"].values()) == pytest.approx(1.0) for r in logged)
    assert pre["sampler"]["masked_attribute_words"] > 0 and pre["sampler"]["swap_negatives"] > 0

    rng = np.random.default_rng(0)
    embs = rng.normal(size=(40, 16)).astype(np.float32)
    maker = QueryMaker(frozenset({"brand0", "brand1", "brand2", "brand3", "brand4"}), frozenset({"red", "blue", "navy", "black"}))
    groups = mine_groups(products, embs, embs[::-1].copy(), lambda qs: rng.normal(size=(len(qs), 16)).astype(np.float32), maker, SCHEMA,
                         count=8, alpha_t2p=0.9, negatives=3, pool=10, progress=False)
    for g in groups:
        assert g.positive not in g.negatives and len(set(g.negatives)) == 3
        assert all(products[j].title.lower() != g.query.lower() for j in g.negatives)
    ft = RerankerTrainer(RerankerTrainConfig(stage="finetune", out_dir=str(tmp_path / "ft"), init=str(tmp_path / "pre" / "model.pt"),
                                             steps=2, groups_per_step=4, negatives=3), products, patches, groups=groups, progress=False).run()
    assert "listwise" in ft["final_losses"]
    assert 0 < ft["prior_weight"] != 20.0  # started from prior_init and learned
    tuned, encoder, _ = load_cross_encoder(tmp_path / "ft" / "model.pt")
    assert float(tuned.prior_weight) == pytest.approx(ft["prior_weight"])
    st = RerankerTrainer(RerankerTrainConfig(stage="distill", out_dir=str(tmp_path / "st"), init=str(tmp_path / "ft" / "model.pt"),
                                             steps=2, groups_per_step=4, negatives=3, student_layers=1), products, patches, groups=groups, progress=False).run()
    assert st["layers"] == 1
    student, _, extra = load_cross_encoder(tmp_path / "st" / "model.pt")
    assert student.num_layers == 1 and extra["stage"] == "distill"
    with pytest.raises(ValueError):
        RerankerTrainer(RerankerTrainConfig(stage="finetune", out_dir=str(tmp_path / "x"), init=str(tmp_path / "pre" / "model.pt"), steps=5),
                        products, patches, groups=groups[:2], progress=False)


def test_reranking_rows_carry_first_stage_scores_and_the_prior_is_added():
    from trainer.cross_encoder.data import RerankGroup, rows_for_groups
    from trainer.cross_encoder.train import group_scores

    torch.manual_seed(0)
    model, encoder = create_cross_encoder("tiny", pretrained=False)
    products = _products(8)
    patches = np.random.default_rng(0).normal(size=(8, 1, 64)).astype(np.float16)
    groups = [RerankGroup("red tshirts", 0, (1, 2), True, "blue tshirts", (0.9, 0.5, 0.4)),
              RerankGroup("black sandals", 3, (4, 5), False, None, (0.7, 0.6, 0.1))]
    batch, width = rows_for_groups(groups, products, patches, encoder)
    assert width == 3 and batch.extra["swaps"] == 1
    assert batch.extra["first_stage"].tolist() == pytest.approx([0.9, 0.5, 0.4, 0.7, 0.6, 0.1, 0.9])  # the swap row: its positive's
    with torch.no_grad():
        model.prior_weight.fill_(7.0)
        logits = model.eval().score(**batch.inputs())
        scores, swaps = group_scores(model, batch, width)
    expected = logits + 7.0 * batch.extra["first_stage"]
    assert torch.allclose(scores.flatten(), expected[:6], atol=1e-5) and torch.allclose(swaps, expected[6:], atol=1e-5)
    # Without first-stage scores on every group the batch carries none, and the logits rank alone.
    bare, _ = rows_for_groups([groups[0], RerankGroup("bags", 6, (7, 1), True, None)], products, patches, encoder)
    assert "first_stage" not in bare.extra


def test_query_maker_drops_brand_and_non_visual_words():
    from trainer.cross_encoder.data import QueryMaker

    maker = QueryMaker(frozenset({"nike"}), frozenset({"blue", "cricket", "jersey"}))
    assert maker.visual("Nike Men Blue T20 Indian Cricket Jersey") == "men blue cricket jersey"
    query, filters = maker.make(_products(1)[0], "shopper", np.random.default_rng(0))
    assert filters and all(v in query for _, v in filters)


# ------------------------------------------------------------------ evaluation


def test_reranked_rank_and_auc():
    first = np.array([0.5, 0.9, 0.1, 0.7])
    top = np.array([1, 3, 0])
    assert reranked_rank(first, np.array([0.0, 0.0, 5.0]), top, 0) == 0
    assert reranked_rank(first, np.array([9.0, 0.0, 5.0]), top, 0) == 1
    assert reranked_rank(first, np.array([9.0, 0.0, 5.0]), np.array([1, 3]), 2) == 3  # outside the top: first-stage rank
    assert binary_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert binary_auc(np.array([1.0]), np.array([1.0])) == 0.5


class OracleScorer:
    """Scores a candidate by whether its patch row carries the query's marker."""

    def __init__(self, markers: dict[str, float], prior_weight: float = 0.0):
        self.markers, self.prior_weight = markers, prior_weight

    def with_prior(self, logits, first_stage):
        return logits + self.prior_weight * first_stage

    def score(self, query, titles, patches, *, aligned=None):
        return -np.abs(patches[:, 0, 0] - self.markers.get(query, -99.0))

    def score_pairs(self, queries, titles, patches, *, aligned=None):
        return np.array([self.score(q, [t], patches[i : i + 1])[0] for i, (q, t) in enumerate(zip(queries, titles))])


def test_rerank_evaluator_counts_what_the_reranker_fixes():
    products = _products(40)
    products = [Product(id=p.id, title=f"{p.title} {i}", images=p.images, split="test", attributes=p.attributes, subcategory="Topwear") for i, p in enumerate(products)]
    rng = np.random.default_rng(0)
    titles = rng.normal(size=(40, 8)).astype(np.float32)
    images = rng.normal(size=(40, 8)).astype(np.float32)  # unrelated: the dual encoder is poor
    patches = np.zeros((40, 1, 2), np.float32)
    patches[:, 0, 0] = np.arange(40)
    scorer = OracleScorer({p.title: float(i) for i, p in enumerate(products)})
    evaluator = RerankEvaluator(top_n=40, num_queries=20, num_negatives=39, t2p_queries=5, tia_pairs=10, progress=False)
    report = evaluator(scorer, products, titles, images, patches, lambda qs: rng.normal(size=(len(qs), 8)).astype(np.float32))
    t2i = report["t2i_sample"]
    assert t2i["reranked"]["R@1"] == 1.0 and t2i["dual_encoder"]["R@1"] < 0.5
    assert t2i["cross_only"] == t2i["reranked"]
    assert report["tia"]["random"]["auc"] == 1.0

    # A prior weight that swamps the logits gives back the first stage's order; cross_only does not change.
    swamped = evaluator(OracleScorer(scorer.markers, prior_weight=1e6), products, titles, images, patches,
                        lambda qs: rng.normal(size=(len(qs), 8)).astype(np.float32))["t2i_sample"]
    assert swamped["reranked"] == t2i["dual_encoder"] and swamped["cross_only"]["R@1"] == 1.0

    # The sweep scores each weight from the same logits; the best on this split is the logit alone.
    sweeping = RerankEvaluator(top_n=40, num_queries=20, num_negatives=39, t2p_queries=5, tia_pairs=10, prior_grid=(0.0, 1e6), progress=False)
    report = sweeping(scorer, products, titles, images, patches, lambda qs: rng.normal(size=(len(qs), 8)).astype(np.float32))
    sweep = report["prior_sweep"]
    assert sweep["weights"] == [0.0, 1e6] and sweep["t2i_R@1"] == [1.0, t2i["dual_encoder"]["R@1"]]
    assert len(sweep["t2p_nDCG@10"]) == 2 and best_prior_weight(sweep) == 0.0
    assert best_prior_weight({"weights": [0.0, 5.0], "t2i_R@1": [0.3, 0.3], "t2p_nDCG@10": [0.5, 0.5]}) == 5.0  # ties: the larger


def test_pretraining_match_rows_carry_no_masks():
    """TIA rows are unmasked: [MASK] tokens or zeroed patches would give matched pairs away."""
    from trainer.cross_encoder.data import PretrainSampler

    products = _products()
    patches = np.random.default_rng(0).normal(size=(40, 4, 8)).astype(np.float16) + 5  # no zero rows
    encoder = get_pair_encoder(get_cross_encoder_config("tiny"))
    batch = PretrainSampler(products, patches, encoder, SCHEMA, seed=0).batch(16)
    tia = batch.extra["tia_rows"]
    assert tia == 16 and batch.input_ids.shape[0] == 16 + int(batch.match[:16].sum())
    assert not (batch.input_ids[:tia] == encoder.mask_id).any() and not (batch.patches[:tia] == 0).all(-1).any()
    assert (batch.mlm_labels[:tia] == IGNORE_INDEX).all() and not batch.patch_mask[:tia].any()
    assert (batch.mlm_labels[tia:] != IGNORE_INDEX).any(1).all() and batch.patch_mask[tia:].any(1).all()
    assert set(batch.match[:tia].tolist()) == {0.0, 1.0}


def test_reranker_export_caps_the_text_below_what_it_trained_with(tmp_path):
    from tests.support.indexes import export_tiny_bundle
    from trainer.cross_encoder.export import export_reranker_copy
    from trainer.cross_encoder.factory import save_cross_encoder
    from vitrine.runtime import read_manifest
    from vitrine.runtime.reranker import load_reranker

    bundle = export_tiny_bundle(tmp_path / "bundle")
    torch.manual_seed(0)
    model, encoder = create_cross_encoder("tiny", pretrained=False)
    ckpt = save_cross_encoder(model, tmp_path / "ce.pt")
    export_reranker_copy(ckpt, bundle, tmp_path / "full")
    spec = export_reranker_copy(ckpt, bundle, tmp_path / "capped", max_query_tokens=2, max_title_tokens=3)
    assert (spec.max_query_tokens, spec.max_title_tokens) == (2, 3) and spec.parity["max_abs_diff"] <= 1e-4
    full, capped = (load_reranker(tmp_path / n, read_manifest(tmp_path / n), threads=1) for n in ("full", "capped"))
    patches = np.random.default_rng(2).normal(size=(2, 1, 64)).astype(np.float32)
    titles = ["Nike Red Summer Dress For Women", "Blue Black Running Shoes"]
    # the capped reranker reads only the first 2 query and 3 title words (one token each here)
    np.testing.assert_allclose(capped.score("red floral dress", titles, patches),
                               full.score("red floral", ["Nike Red Summer", "Blue Black Running"], patches), atol=1e-5)
    assert not np.allclose(capped.score("red floral dress", titles, patches), full.score("red floral dress", titles, patches))
    with pytest.raises(ValueError, match="exceed"):
        export_reranker_copy(ckpt, bundle, tmp_path / "wider", max_title_tokens=encoder.max_title_tokens + 1)
