"""Concept graph mined from fixed titles, and MMR prototype selection on fixed embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.concepts import ConceptGraph, words
from trainer.prototypes import select_prototypes


def row(title: str, article: str, colour: str = "Blue", gender: str = "Men", usage: str = "Sports", season: str = "Summer"):
    return {"title": title, "articleType": article, "baseColour": colour, "gender": gender, "usage": usage, "season": season}


PRODUCTS = (
    [row("Nike Men Indian Cricket Jersey", "Tshirts")] * 2
    + [row("Puma Men Indian Cricket Jersey", "Tshirts")]
    + [row("Adidas Men Cricket Jersey", "Tshirts")] * 2
    + [row("Nike Men Football Jersey", "Tshirts", colour="Red")] * 2
    + [row("Puma Deck Navy Blue Backpack", "Backpacks", colour="Navy Blue", gender="Unisex", usage="Casual")] * 2
    + [row("Wildcraft Unisex Navy Blue Backpack", "Backpacks", colour="Navy Blue", gender="Unisex", usage="Casual")]
    + [row("Nike Set of 2", "Socks")] * 3
    + [row("Catwalk Women Blue Casual Shoes", "Casual Shoes", gender="Women", usage="Casual")] * 3
)

pytestmark = pytest.mark.torch  # needs the train extra


@pytest.fixture(scope="module")
def graph() -> ConceptGraph:
    return ConceptGraph.build(PRODUCTS, min_count=3)


def test_title_suffixes_become_concepts_when_frequent(graph):
    assert {"jersey", "cricket jersey", "indian cricket jersey", "backpack", "navy blue backpack"} <= set(graph.concepts)
    assert "football jersey" not in graph.concepts  # only 2 titles: below min_count
    # Brand words, stopwords and numbers alone are no concepts; nor are phrases ending in them.
    assert not {"nike", "puma", "2", "of 2", "set of 2"} & set(graph.concepts)


def test_attribute_values_are_lower_case_concepts(graph):
    for value in ("tshirts", "blue", "navy blue", "men", "unisex", "sports", "casual", "summer", "casual shoes"):
        assert value in graph.concepts
    assert "attribute:articleType" in graph.kinds[graph.index("casual shoes")]
    assert "phrase" in graph.kinds[graph.index("casual shoes")]  # also a title suffix


def test_is_a_edges_follow_suffix_and_attribute_containment(graph):
    names = lambda ids: set(graph.phrases(ids))  # noqa: E731
    assert names(graph.parents[graph.index("indian cricket jersey")]) == {"cricket jersey"}
    assert names(graph.hypernyms("indian cricket jersey")) == {"cricket jersey", "jersey"}
    assert {"blue backpack", "navy blue"} <= names(graph.hypernyms("navy blue backpack"))
    assert {"backpack", "blue"} <= names(graph.hypernyms("navy blue backpack"))
    assert "blue" in names(graph.hypernyms("navy blue"))
    assert "shoes" in names(graph.hypernyms("casual shoes"))
    assert graph.hypernyms("jersey") == []
    with pytest.raises(KeyError):
        graph.hypernyms("no such concept")


def test_text_concepts_include_attributes_and_hypernyms(graph):
    first = set(graph.phrases(graph.concepts_of(0)))
    assert {"indian cricket jersey", "cricket jersey", "jersey", "tshirts", "blue", "men", "sports", "summer"} <= first
    football = set(graph.phrases(graph.concepts_of(5)))
    assert "red" in football and "football jersey" not in football and "jersey" in football
    query = set(graph.phrases(graph.concepts_of("blue cricket jersey")))
    assert query == {"cricket jersey", "jersey", "blue"}
    with pytest.raises(IndexError):
        graph.concepts_of(len(PRODUCTS))


def test_stats_and_json_round_trip(graph, tmp_path):
    stats = graph.stats()
    assert stats["texts"] == len(PRODUCTS) and stats["concepts"] == len(graph.concepts)
    assert stats["texts_without_concepts"] == 0 and stats["is_a_edges"] > 0
    restored = ConceptGraph.from_json(graph.to_json())
    assert restored.concepts == graph.concepts and restored.parents == graph.parents
    assert restored.concepts_of(3) == graph.concepts_of(3)
    assert restored.concepts_of("blue cricket jersey") == graph.concepts_of("blue cricket jersey")
    with pytest.raises(ValueError, match="not a Vitrine concept graph"):
        ConceptGraph.from_json(json.dumps({"concepts": []}))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="no products"):
        ConceptGraph.build([])
    with pytest.raises(ValueError, match="non-empty title"):
        ConceptGraph.build([{"title": "  "}])
    with pytest.raises(TypeError):
        ConceptGraph.build([42])
    assert words("Nike Men's T-Shirt, U.S. Polo") == ["nike", "men's", "t-shirt", "u.s", "polo"]


@pytest.mark.integration
def test_graph_on_the_real_catalog(fashion_products: Path):
    rows = [json.loads(line) for line in (fashion_products / "products.jsonl").open()]
    train = [r for r in rows if r["split"] == "train"]
    graph = ConceptGraph.build(train, min_count=5)
    stats = graph.stats()
    assert stats["texts_without_concepts"] == 0
    assert stats["phrase_concepts"] > 100 and stats["mean_concepts_per_text"] > 3
    assert "nike" not in graph.concepts and "t-shirt" in graph.concepts


# -- prototypes ---------------------------------------------------------------------------------


def test_mmr_prefers_a_diverse_second_prototype_over_a_near_duplicate():
    concept = np.array([[1.0, 0.0, 0.0]])

    def at(angle: float, axis: int) -> list[float]:  # unit vector `angle` rad away from the concept
        v = [np.cos(angle), 0.0, 0.0]
        v[axis] = np.sin(angle)
        return v

    images = np.array(
        [
            at(0.30, 1),  # best match
            at(0.31, 1),  # near-duplicate of the best, second by relevance
            at(0.35, 2),  # a bit less relevant, but a different look
            at(1.50, 1),  # irrelevant
        ]
    )
    picks = select_prototypes(concept, images, k=4, q=2, lam=0.8)
    assert picks.tolist() == [[0, 2]]
    # Pure relevance (lam=1) would take the near-duplicate.
    assert select_prototypes(concept, images, k=4, q=2, lam=1.0).tolist() == [[0, 1]]


def test_prototypes_come_from_each_concepts_top_k():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(50, 8)).astype(np.float32)
    concepts = images[[3, 17]] + 0.01 * rng.normal(size=(2, 8)).astype(np.float32)
    picks = select_prototypes(concepts, images, k=5, q=3)
    assert picks.shape == (2, 3) and picks.dtype == np.int64
    assert picks[0, 0] == 3 and picks[1, 0] == 17
    sims = (concepts / np.linalg.norm(concepts, axis=1, keepdims=True)) @ (
        images / np.linalg.norm(images, axis=1, keepdims=True)
    ).T
    top5 = np.argsort(-sims, axis=1)[:, :5]
    assert all(set(p) <= set(t) for p, t in zip(picks, top5))
    assert all(len(set(p)) == 3 for p in picks)


def test_fewer_images_than_prototypes_pads_with_minus_one():
    picks = select_prototypes(np.eye(2, 4), np.eye(4)[:2], k=32, q=4)
    assert picks.shape == (2, 4)
    assert picks[:, :2].min() >= 0 and (picks[:, 2:] == -1).all()


def test_prototype_input_checks():
    with pytest.raises(ValueError, match="widths differ"):
        select_prototypes(np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        select_prototypes(np.array([[np.nan, 1.0]]), np.ones((3, 2)))
    with pytest.raises(ValueError, match="all-zero"):
        select_prototypes(np.ones((1, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="lam"):
        select_prototypes(np.ones((1, 2)), np.ones((3, 2)), lam=1.5)
    with pytest.raises(ValueError):
        select_prototypes(np.ones(2), np.ones((3, 2)))
