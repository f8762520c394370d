"""Shopper queries as a training signal: the sampler, the query-to-product loss, and the recipe with it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.support.catalogs import make_training_catalog
from trainer.loss import query_product_loss
from trainer.shopper_queries import TRAINING_TEMPLATES, ShopperQuerySampler
from trainer.train import TrainConfig, train
from vitrine.catalog.product import BytesImage, Product
from vitrine.evaluation.queries import SHOPPER_TEMPLATES, ShopperQuery, relevance_matrix

pytestmark = pytest.mark.torch


def products() -> list[Product]:
    rows = [
        ("1", "Women", "Casual", "Red", "Handbags"),
        ("2", "Women", "Casual", "Red", "Handbags"),
        ("3", "Women", "Formal", "Black", "Handbags"),
        ("4", "Men", "Formal", "Black", "Shirts"),
        ("5", "Unisex", "NA", "Blue", "Watches"),  # shoppers type neither "unisex" nor "na"
        ("6", "Men", "", "", ""),  # no article type and no subcategory: no query at all
    ]
    return [Product(id=i, title=f"title {i}", images=(BytesImage(b"x"),), subcategory="Bags" if t else "",
                    attributes={"gender": g, "usage": u, "baseColour": c, "articleType": t}) for i, g, u, c, t in rows]


def test_templates_cover_the_evaluation_templates_and_always_name_the_article_type():
    assert set(SHOPPER_TEMPLATES) <= set(TRAINING_TEMPLATES)
    assert len(TRAINING_TEMPLATES) == 8 and all(t[-1] == "articleType" for t in TRAINING_TEMPLATES)


def test_each_product_spells_its_usable_queries():
    sampler = ShopperQuerySampler(products())
    spelled = [{sampler.texts[text_id] for text_id, _ in mine} for mine in sampler.choices]
    assert "women casual red handbags" in spelled[0] and "red handbags" in spelled[0] and "handbags" in spelled[0]
    assert spelled[0] == spelled[1]
    assert spelled[4] == {"watches", "blue watches"}  # no "unisex ..." and no "na ..." queries
    assert spelled[5] == set()
    assert len(sampler.texts) == len(set(sampler.texts))


def test_positives_are_what_the_evaluation_counts_relevant():
    catalog = products()
    sampler = ShopperQuerySampler(catalog)
    rows = np.arange(len(catalog))
    for row in range(5):
        for pick in range(len(sampler.choices[row])):
            kept, text_ids, codes = sampler.draw(np.array([row]), np.array([pick]))
            assert kept.tolist() == [row]
            text = sampler.texts[text_ids[0]]
            template = next(t for t in TRAINING_TEMPLATES if len(t) == len(text.split()) and
                            " ".join(p.lower() for p in _values(catalog[row], t)) == text)  # fmt: skip
            query = ShopperQuery(text, tuple(zip(template, text.split())))
            assert sampler.positives(codes, rows)[0].tolist() == relevance_matrix([query], catalog)[0].tolist(), text


def _values(product: Product, template) -> list[str]:
    from vitrine.evaluation.queries import product_attribute

    return [product_attribute(product, a) for a in template]


def test_draw_skips_products_without_a_query_and_wraps_picks():
    sampler = ShopperQuerySampler(products())
    kept, text_ids, codes = sampler.draw(np.array([5, 0, 4]), np.array([0, 7, 1 << 29]))
    assert kept.tolist() == [0, 4] and codes.shape == (2, len(sampler.attributes)) and len(text_ids) == 2
    assert sampler.texts[text_ids[0]] == sampler.texts[sampler.choices[0][7 % len(sampler.choices[0])][0]]
    empty = sampler.draw(np.array([5]), np.array([0]))
    assert empty[0].size == 0 and empty[2].shape == (0, len(sampler.attributes))


def test_query_loss_with_one_positive_is_cross_entropy_over_titles_and_photos():
    torch.manual_seed(0)
    q, t, i = (F.normalize(torch.randn(n, 8), dim=-1) for n in (3, 5, 5))
    scale = torch.tensor(10.0)
    positive = torch.zeros(3, 5, dtype=torch.bool)
    positive[[0, 1, 2], [4, 0, 2]] = True
    labels = torch.tensor([4, 0, 2])
    expected = (F.cross_entropy(scale * q @ t.T, labels) + F.cross_entropy(scale * q @ i.T, labels)) / 2
    assert query_product_loss(q, t, i, positive, scale) == pytest.approx(float(expected), rel=1e-6)
    # a second matching product adds its softmax mass: the loss falls
    positive[0, 1] = True
    assert query_product_loss(q, t, i, positive, scale) < expected
    assert query_product_loss(q, t, i, positive, scale, reduction="none").shape == (3,)
    with pytest.raises(ValueError, match="at least one"):
        query_product_loss(q, t, i, torch.zeros(3, 5, dtype=torch.bool), scale)


def test_recipe_trains_with_shopper_queries(tmp_path):
    catalog = make_training_catalog(tmp_path / "catalog")
    config = TrainConfig(catalog=str(catalog), out=str(tmp_path / "run"), model="tiny-ap", pretrained="none", epochs=2,
                         batch_size=8, val_queries=12, val_every=1, lr=3e-3, text_lr=1e-3, warmup_steps=1,
                         cache_dir=str(tmp_path / "cache"), progress=False, text_unlocked_layers=1, query_weight=1.0)  # fmt: skip
    summary = train(config)
    assert all(r["loss_query"] > 0 for r in summary["history"])
    assert summary["shopper_queries"]["texts"] > 0 and summary["shopper_queries"]["products_with_one"] > 0
    off = train(TrainConfig(**{**config.to_dict(), "out": str(tmp_path / "off"), "query_weight": 0.0}))
    assert "loss_query" not in off["history"][0] and off["shopper_queries"] is None
