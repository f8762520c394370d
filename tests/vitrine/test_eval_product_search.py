"""Shopper queries, shopper photos and the product-search metrics and evaluators."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.support.encoders import ColourHashEncoder
from vitrine.catalog.product import BytesImage, Product
from vitrine.evaluation.evaluator import ImageToProductEvaluator, TextToProductEvaluator, embed_split
from vitrine.evaluation.photos import CROP_RANGE, i2p_query_products, shopper_photo, shopper_photo_rng
from vitrine.evaluation.product_search import i2p_metrics, t2p_metrics
from vitrine.evaluation.queries import compose_shopper_queries, relevance_matrix


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def jpeg(colour, size=(40, 60)) -> BytesImage:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), colour), (size[0] // 4, size[1] // 4))
    image.save(buffer, "JPEG", quality=92)
    return BytesImage(buffer.getvalue(), name=f"{colour}")


def product(
    ident, title, gender="Men", colour="Black", article="Tshirts", usage="Casual", rgb=(20, 20, 20)
) -> Product:
    attributes = {"gender": gender, "baseColour": colour, "articleType": article, "usage": usage}
    return Product(
        id=ident,
        title=title,
        images=(jpeg(rgb),),
        category="Apparel",
        subcategory=article,
        attributes=attributes,
    )


# ---------------------------------------------------------------- shopper queries


def shop() -> list[Product]:
    return [
        product("1", "Nike Men Black Tee", "Men", "Black", "Tshirts", "Sports"),
        product("2", "Puma Men Navy Blue Casual Shoes", "Men", "Navy Blue", "Casual Shoes", "Casual"),
        product("3", "Baggit Women Red Handbag", "Women", "Red", "Handbags", "Casual"),
        product("4", "Lavie Women Red Handbag", "Women", "red", "Handbags", "Casual"),
        product("5", "Titan Unisex Black Watch", "Unisex", "Black", "Watches", "NA"),
        product("6", "Fastrack Men Black Watch", "Men", "Black", "Watches", "Casual"),
    ]


def test_shopper_queries_are_lower_case_realistic_and_match_products():
    products = shop()
    queries = compose_shopper_queries(products, num_queries=100, seed=0)
    texts = [q.text for q in queries]
    assert len(texts) == len(set(texts))
    assert all(t == t.lower() for t in texts)
    for expected in (
        "women red handbags",
        "men navy blue casual shoes",
        "black watches",
        "men watches",
        "men sports tshirts",
    ):
        assert expected in texts
    assert not any("unisex" in t for t in texts)
    assert not any(" na " in f" {t} " for t in texts)
    assert "men casual casual shoes" not in texts  # the article type already says "casual"
    relevant = relevance_matrix(queries, products)
    assert relevant.any(axis=1).all()
    by_text = dict(zip(texts, relevant))
    assert by_text["women red handbags"].tolist() == [
        False,
        False,
        True,
        True,
        False,
        False,
    ]  # "red" == "Red"
    assert by_text["black watches"].tolist() == [False, False, False, False, True, True]
    assert by_text["men watches"].tolist() == [False, False, False, False, False, True]


def test_shopper_queries_are_seeded_and_spread_over_templates():
    products = [
        product(str(i), f"p{i}", g, c, a, u)
        for i, (g, c, a, u) in enumerate(
            (g, c, a, u)
            for g in ("Men", "Women")
            for c in ("Black", "Red", "Blue", "White")
            for a in ("Tshirts", "Shirts", "Jeans")
            for u in ("Casual", "Formal")
        )
    ]
    a = compose_shopper_queries(products, num_queries=12, seed=1)
    assert [q.text for q in a] == [q.text for q in compose_shopper_queries(products, num_queries=12, seed=1)]
    assert [q.text for q in a] != [q.text for q in compose_shopper_queries(products, num_queries=12, seed=2)]
    assert len(a) == 12
    lengths = sorted(len(q.filters) for q in a)
    # 4 templates (2 attributes x2, 3 attributes x2): 3 queries each
    assert lengths == [2] * 6 + [3] * 6
    assert (
        len(compose_shopper_queries(products, num_queries=10_000, seed=0)) < 10_000
    )  # only existing combinations


def test_t2p_metrics_on_hand_made_rankings():
    # 4 products along 4 axes; two queries with known top-10 lists.
    titles = images = np.eye(4, dtype=np.float32)
    queries = unit([[1, 0.5, 0, 0], [0, 0, 1, 0.9]])
    relevant = np.array([[False, True, False, False], [False, False, True, True]])
    metrics = t2p_metrics(queries, relevant, titles, images, alpha=0.5)
    # query 0 ranks products 0 (non-relevant), 1 (relevant): P@1 0, P@10 0.1, nDCG 1/log2(3), capped R 1/1
    # query 1 ranks 2, 3 first (both relevant): P@1 1, P@10 0.2, nDCG 1, capped R 2/2
    assert metrics["P@1"] == pytest.approx(0.5)
    assert metrics["P@10"] == pytest.approx(0.15)
    assert metrics["nDCG@10"] == pytest.approx((1 / np.log2(3) + 1) / 2)
    assert metrics["R@10_capped"] == pytest.approx(1.0)
    assert metrics["queries"] == 2


# ---------------------------------------------------------------- shopper photos


def test_shopper_photo_is_seeded_and_crops_within_range():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, size=(200, 150, 3), dtype=np.uint8))
    sizes = set()
    for index in range(25):
        a = shopper_photo(image, shopper_photo_rng(seed=3, product_index=index))
        b = shopper_photo(image, shopper_photo_rng(seed=3, product_index=index))
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
        w, h = a.size
        assert round(150 * CROP_RANGE[0]) <= w <= round(150 * CROP_RANGE[1])
        assert round(200 * CROP_RANGE[0]) <= h <= round(200 * CROP_RANGE[1])
        sizes.add(a.size)
    assert len(sizes) > 5  # crops really vary
    other = shopper_photo(image, shopper_photo_rng(seed=4, product_index=0))
    first = shopper_photo(image, shopper_photo_rng(seed=3, product_index=0))
    assert other.size != first.size or not np.array_equal(np.asarray(other), np.asarray(first))


def test_shopper_photo_handles_tiny_images():
    photo = shopper_photo(Image.new("RGB", (2, 3), (10, 20, 30)), np.random.default_rng(0))
    assert 1 <= photo.size[0] <= 2 and 1 <= photo.size[1] <= 3


def test_i2p_metrics_ties_count_against():
    products = unit([[1, 0], [1, 0], [0, 1]])
    queries = products[[0, 2]]
    metrics = i2p_metrics(queries, np.array([0, 2]), products, products, alpha=0.5)
    # product 0 ties with its duplicate product 1 -> rank 1; product 2 -> rank 0
    assert metrics["R@1"] == 0.5 and metrics["R@5"] == 1.0 and metrics["queries"] == 2
    assert i2p_query_products(10, 4, seed=0).tolist() == i2p_query_products(10, 4, seed=0).tolist()
    assert i2p_query_products(10, 50, seed=0).tolist() == list(range(10))


def test_product_search_evaluators_with_the_test_encoder():
    colours = {
        "Red": (200, 30, 30),
        "Blue": (40, 90, 200),
        "Green": (40, 140, 60),
        "Black": (20, 20, 20),
        "Yellow": (240, 210, 40),
    }
    products = [
        product(f"{c}-{g}-{a}", f"Brand {g} {c} {a}", g, c, a, "Casual", rgb)
        for c, rgb in colours.items()
        for g in ("Men", "Women")
        for a in ("Tshirts", "Shirts")
    ]
    encoder = ColourHashEncoder()
    data = embed_split(products, encoder, batch_size=7, progress=False)
    t2p = TextToProductEvaluator(num_queries=30, alpha=0.5, seed=0, batch_size=8, progress=False)(
        encoder, products, data
    )
    assert t2p["queries"] == 30 and 0.0 <= t2p["nDCG@10"] <= 1.0
    queries = compose_shopper_queries(products, num_queries=30, seed=0)
    chance_p1 = relevance_matrix(queries, products).mean()  # expected P@1 of a random ranking
    assert t2p["P@1"] > 2 * chance_p1  # colour and article words are real signal for this encoder
    i2p_eval = ImageToProductEvaluator(num_queries=20, alpha=0.5, seed=0, batch_size=6, progress=False)
    first = i2p_eval(encoder, products, data)
    assert first == i2p_eval(encoder, products, data)  # seeded photos: same metrics
    assert first["queries"] == 20 and first["R@20"] >= first["R@10"] >= first["R@1"] >= 0.0
