"""vitrine.scoring: the fusion formula, the α of each query kind, and the rerank prior."""
from __future__ import annotations

import numpy as np
import pytest

from vitrine.scoring import Alphas, add_prior, blend_product_vectors, fuse, weighted_i2p, weighted_t2p


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_weighted_t2p_is_the_alpha_blend_of_title_and_image_similarity():
    rng = np.random.default_rng(0)
    q, titles, images = (
        unit(rng.normal(size=(3, 8))),
        unit(rng.normal(size=(5, 8))),
        unit(rng.normal(size=(5, 8))),
    )
    for alpha in (0.0, 0.3, 0.5, 1.0):
        expected = alpha * (q @ titles.T) + (1 - alpha) * (q @ images.T)
        np.testing.assert_allclose(weighted_t2p(q, titles, images, alpha), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weighted_i2p(q, titles, images, alpha), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            weighted_t2p(q[0], titles, images, alpha), expected[0], rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(weighted_t2p(q, titles, images, 1.0), q @ titles.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weighted_i2p(q, titles, images, 0.0), q @ images.T, rtol=1e-5, atol=1e-6)
    assert blend_product_vectors(titles, images, 0.5).dtype == np.float32


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_weighted_scores_reject_alpha_outside_unit_interval(alpha):
    e = unit([[1, 0]])
    with pytest.raises(ValueError, match="alpha"):
        weighted_t2p(e, e, e, alpha)


def test_fuse_on_vectors_equals_fuse_on_similarities():
    rng = np.random.default_rng(1)
    q, title, image = unit(rng.normal(size=(1, 6)))[0], unit(rng.normal(size=(4, 6))), unit(rng.normal(size=(4, 6)))
    np.testing.assert_allclose(blend_product_vectors(title, image, 0.3) @ q, fuse(title @ q, image @ q, 0.3), rtol=1e-5)
    assert fuse(0.8, 0.2, 0.25) == pytest.approx(0.35)


def test_alphas_per_query_kind_fall_back_to_the_joint_alpha():
    assert Alphas(0.6).for_kind("text") == Alphas(0.6).for_kind("image") == 0.6
    tuned = Alphas(0.5, alpha_t2p=0.9, alpha_i2p=0.1)
    assert (tuned.for_kind("text"), tuned.for_kind("image")) == (0.9, 0.1)
    assert tuned.resolve("text", None) == 0.9 and tuned.resolve("image", 0.4) == 0.4
    assert tuned.as_dict() == {"alpha": 0.5, "alpha_t2p": 0.9, "alpha_i2p": 0.1}
    with pytest.raises(ValueError, match="query kind"):
        tuned.for_kind("audio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        Alphas(0.5, alpha_t2p=1.2)
    with pytest.raises(ValueError, match="alpha"):
        tuned.resolve("text", -0.1)


def test_add_prior_adds_the_weighted_first_stage_score():
    logits = np.array([1.0, -1.0, 0.5], np.float32)
    np.testing.assert_allclose(add_prior(logits, np.array([0.2, 0.9, 0.1]), 2.0), [1.4, 0.8, 0.7], rtol=1e-6)
    with pytest.raises(ValueError, match="one score per candidate"):
        add_prior(logits, np.zeros(2), 1.0)
