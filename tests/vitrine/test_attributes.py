"""Attribute heads: temperature scaling, recall at a precision, training and numpy-only prediction."""
from __future__ import annotations

import numpy as np
import pytest

from vitrine.attributes.calibration import expected_calibration_error, fit_temperature, nll, softmax
from vitrine.attributes.data import AttributeData
from vitrine.attributes.evaluate import evaluate_heads
from vitrine.attributes.heads import AttributeHeads
from vitrine.attributes.metrics import recall_at_precision
from vitrine.attributes.train import label_codes, train_heads
from vitrine.errors import UserError


def _overconfident(n: int = 4000, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose argmax is right 70 % of the time, scaled so softmax claims ~99 %."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    predicted = np.where(rng.random(n) < 0.7, labels, (labels + rng.integers(1, k, n)) % k)
    logits = rng.normal(0, 0.3, (n, k))
    logits[np.arange(n), predicted] += 2.0
    return logits * 4.0, labels


def test_temperature_scaling_lowers_nll_and_ece_of_an_overconfident_model():
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    assert t > 2.0  # the logits were blown up 4x: the fit has to soften them
    assert nll(logits, labels, t) < 0.8 * nll(logits, labels)
    for proba_t in (1.0, t):
        proba = softmax(logits, proba_t)
        assert (proba.argmax(1) == softmax(logits).argmax(1)).all()  # temperature never changes a prediction
    before = softmax(logits)
    after = softmax(logits, t)
    correct = before.argmax(1) == labels
    assert expected_calibration_error(after.max(1), correct) < 0.5 * expected_calibration_error(before.max(1), correct)


def test_temperature_of_a_calibrated_model_stays_near_one():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (5000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(logits)])  # drawn from the model's own probabilities
    assert 0.9 < fit_temperature(logits, labels) < 1.1
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


def test_expected_calibration_error_by_hand():
    # Two bins: 0.95 (2 products, 1 right: |0.5-0.95|) and 0.55 (2 products, both right: |1-0.55|).
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)


def test_recall_at_precision_on_hand_built_lists():
    # Ranked: 1 1 1 1 0 1 1 1 1 0 | 0 0 -> the cut after 10 keeps 8/10 = 0.8; after 9: 8/9 = 0.889; after 4: 1.0
    correct = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0], bool)
    confidence = np.linspace(0.99, 0.5, correct.size)
    at90 = recall_at_precision(confidence, correct, 0.9)
    assert (at90.coverage, at90.recall, at90.precision) == (pytest.approx(4 / 12), pytest.approx(4 / 12), 1.0)
    assert at90.threshold == pytest.approx(confidence[3])
    at80 = recall_at_precision(confidence, correct, 0.8)
    assert (at80.coverage, at80.recall) == (pytest.approx(10 / 12), pytest.approx(8 / 12))
    # Order of the input does not matter, only confidences do.
    order = np.random.default_rng(0).permutation(correct.size)
    assert recall_at_precision(confidence[order], correct[order], 0.9) == at90


def test_recall_at_precision_cuts_only_between_different_confidences():
    # Two tied at the top, one right: the pair is answered together (precision 0.5) or not at all.
    assert recall_at_precision(np.array([0.9, 0.9, 0.1]), np.array([True, False, True]), 0.9).coverage == 0.0
    everything = recall_at_precision(np.array([0.9, 0.8]), np.array([True, True]), 0.9)
    assert (everything.recall, everything.coverage, everything.threshold) == (1.0, 1.0, 0.8)
    assert recall_at_precision(np.zeros(0), np.zeros(0, bool)).count == 0


def _synthetic(n: int = 600, dim: int = 8, seed: int = 0) -> AttributeData:
    """Colour shows in the image vector, gender in the title vector; a few values missing."""
    rng = np.random.default_rng(seed)
    colours, genders = np.array(["Red", "Blue", "Green"]), np.array(["Men", "Women"])
    colour, gender = rng.integers(0, 3, n), rng.integers(0, 2, n)
    image = rng.normal(0, 1.0, (n, dim))
    title = rng.normal(0, 1.0, (n, dim))
    image[np.arange(n), colour] += 2.5
    title[np.arange(n), gender] += 2.5
    values = {"baseColour": colours[colour].astype(object), "gender": genders[gender].astype(object)}
    values["gender"][::50] = ""  # products without a gender are left out of its head
    return AttributeData(
        ids=[str(i) for i in range(n)], splits=np.array(["train", "train", "val", "test"] * (n // 4)),
        values={k: v.astype(str) for k, v in values.items()}, title=title.astype(np.float32), image=image.astype(np.float32),
    )  # fmt: skip


def test_heads_learn_what_each_view_shows_and_predict_with_numpy_after_a_round_trip(tmp_path):
    data = _synthetic()
    scores = {}
    for view in ("image", "title", "both"):
        heads = train_heads(data, view=view, fields=["baseColour", "gender"], bundle_fingerprint="fp", c_grid=(0.1, 1.0))
        scores[view] = evaluate_heads(heads, data.split("test"))
    acc = {view: {f: s[f]["calibrated"]["accuracy"] for f in s} for view, s in scores.items()}
    assert acc["image"]["baseColour"] > 0.85 and acc["image"]["gender"] < 0.7  # colour is in the image only
    assert acc["title"]["gender"] > 0.85 and acc["title"]["baseColour"] < 0.6
    assert acc["both"]["baseColour"] > 0.85 and acc["both"]["gender"] > 0.85
    assert scores["both"]["gender"]["products"] == sum(data.split("test").values["gender"] != "")

    heads.save(tmp_path / "heads")
    loaded = AttributeHeads.load(tmp_path / "heads")
    test = data.split("test")
    before, after = heads.predict(test.title, test.image), loaded.predict(test.title, test.image)
    for name in ("baseColour", "gender"):
        assert before[name][0] == after[name][0]
        np.testing.assert_allclose(before[name][1], after[name][1], rtol=1e-6)
        assert set(before[name][0]) <= set(heads.heads[name].classes)
    assert loaded.heads["gender"].info["val_thresholds"]["0.9"] is not None
    with pytest.raises(UserError, match="8-d"):
        loaded.predict(test.title[:, :4], test.image[:, :4])


def test_a_head_needs_two_values_and_heads_need_files(tmp_path):
    data = _synthetic(n=40)
    data.values["gender"][:] = "Men"
    with pytest.raises(UserError, match="at least 2"):
        train_heads(data, view="both", fields=["gender"], bundle_fingerprint="fp", c_grid=(1.0,))
    with pytest.raises(UserError, match="no attribute heads"):
        AttributeHeads.load(tmp_path)


def test_softmax_regression_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    from vitrine.attributes.softmax import fit_softmax

    data = _synthetic(n=400)
    x, y = data.image, label_codes(["Blue", "Green", "Red"], data.values["baseColour"])
    for C in (0.1, 3.0):
        weight, bias, _ = fit_softmax(x, y, 3, C=C, tol=1e-8)
        oracle = LogisticRegression(C=C, tol=1e-10, max_iter=2000).fit(x, y)
        np.testing.assert_allclose(softmax(x @ weight + bias), oracle.predict_proba(x), atol=2e-3)


def test_embeddings_are_cached_per_bundle_and_products(tmp_path):
    from tests.support.indexes import FixtureEncoder, make_index_catalog
    from vitrine.attributes.data import embed_products
    from vitrine.catalog import read_catalog

    products = read_catalog(make_index_catalog(tmp_path / "catalog", n=6)).products
    cache = tmp_path / "runs" / "embeddings.npz"
    title, image = embed_products(products, FixtureEncoder(), cache)
    assert cache.is_file() and title.shape == image.shape == (6, FixtureEncoder().dim)
    with np.load(cache) as stored:  # same bundle, same products: the cache is read, not recomputed
        np.savez(cache, ids=stored["ids"], fingerprint=stored["fingerprint"], title=stored["title"] * 0, image=stored["image"])
    assert not embed_products(products, FixtureEncoder(), cache)[0].any()
    with np.load(cache) as stored:  # a cache of other products is not used (and is rewritten)
        np.savez(cache, ids=stored["ids"][:3], fingerprint=stored["fingerprint"], title=stored["title"][:3], image=stored["image"][:3])
    assert embed_products(products, FixtureEncoder(), cache)[0].shape[0] == 6
    with np.load(cache) as stored:
        assert stored["ids"].tolist() == [p.id for p in products]
