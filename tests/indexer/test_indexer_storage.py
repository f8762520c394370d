"""Index storage at scale (issue 13): the auto index type, per-file sizes, vectors stored once, compact patches."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer import ProductIndex, faiss_index
from indexer.build import build_index, delete_from_index, upsert_index
from indexer.manifest import read_manifest
from indexer.patch_codec import PatchCodec
from indexer.storage import choose_storage, projection_rows, version_sizes
from tests.support.indexes import FixtureEncoder, PatchFixtureEncoder, make_index_catalog
from vitrine.catalog import read_catalog
from vitrine.runtime.preprocess import PatchSpec

QUERIES = ["red tshirts", "women blue jeans", "black handbags", "green", "men sport shoes"]
FILTERS = [None, {"gender": "women"}, {"category": ["shoes", "bags"]}]


# ---------------------------------------------------------------- the auto index type


def test_auto_picks_by_catalog_size_and_says_why() -> None:
    flat_max, hnsw_max = faiss_index.AUTO_FLAT_MAX, faiss_index.AUTO_HNSW_MAX
    picks = {n: faiss_index.resolve_spec("auto", n, 256) for n in (1_000, flat_max, flat_max + 1, hnsw_max, hnsw_max + 1, 10**8)}
    assert [spec.type for spec in picks.values()] == ["flat", "flat", "hnsw", "hnsw", "ivfpq", "ivfpq"]
    for n, spec in picks.items():
        assert spec.reason.startswith(f"auto: {spec.type} for {n:,}"), spec.reason
        assert faiss_index.IndexSpec.from_dict(spec.to_dict()) == spec  # the reason survives the manifest
    assert faiss_index.resolve_spec("flat", 1_000, 256).reason == ""  # an explicit type needs no reason
    assert "reason" not in faiss_index.resolve_spec("hnsw", 1_000, 256).to_dict()
    # PQ codes past 2M: nlist grows with the catalog and nprobe with nlist (the probed share keeps recall)
    assert picks[10**8].factory == "IVF40000,PQ64np" and picks[10**8].search == {"nprobe": 1000}
    assert faiss_index.resolve_spec("ivfpq", 100_000, 256).search == {"nprobe": 31}
    assert faiss_index.resolve_spec("ivfpq", 2_000, 256).search == {"nprobe": 16}  # small: at least 16


def test_auto_index_records_its_reason(tmp_path: Path) -> None:
    catalog = read_catalog(make_index_catalog(tmp_path / "catalog", 12))
    result = build_index(catalog, FixtureEncoder(), tmp_path / "index", index_type="auto", threads=2)
    assert result.manifest.index["type"] == "flat" and "auto: flat for 12" in result.manifest.index["reason"]
    assert "why: auto: flat for 12" in result.summary()


def test_default_storage_at_10_million_products_fits_3_kb() -> None:
    """The per-product arithmetic of the default settings (docs/RESULTS.md, “Index memory and speed at scale”) at 10M and 100M."""
    rows = {row["products"]: row for row in projection_rows([100_000, 10_000_000, 100_000_000])}
    assert rows[100_000]["vectors"] == "float32" and rows[10_000_000]["vectors"] == "float16"
    assert rows[10_000_000]["index_type"].startswith("ivfpq") and rows[10_000_000]["patches_storage"] == "pca-int8"
    assert rows[10_000_000]["bytes_per_product"] <= 3072 and rows[100_000_000]["bytes_per_product"] <= 3072
    assert rows[100_000]["per_file"]["text.faiss"] == 0  # flat: built at load, the vectors are stored once


def test_storage_choice_by_size_and_patch_budget() -> None:
    flat = faiss_index.resolve_spec("flat", 10, 8)
    small_patches, big_patches = PatchSpec(grid=(2, 3), dim=4), PatchSpec(grid=(7, 7), dim=320)
    small = choose_storage(10, flat, small_patches)
    assert (small.vectors, small.faiss_files, small.patches) == ("float32", False, "float16")
    big = choose_storage(faiss_index.AUTO_FLAT_MAX + 1, faiss_index.resolve_spec("hnsw", 10, 8), big_patches)
    assert (big.vectors, big.faiss_files, big.patches, big.patch_components) == ("float16", True, "pca-int8", 24)
    assert len(big.reasons) == 2
    assert choose_storage(10, flat, big_patches).patches == "pca-int8"  # over the 2 KB budget at any size (issue 12)
    pooled = choose_storage(10, flat, PatchSpec(grid=(3, 3), dim=320))
    assert (pooled.patches, pooled.patch_components) == ("pca-int8", 130)  # a coarser grid keeps more channels: 9 x 130 + 2 B
    assert choose_storage(faiss_index.AUTO_FLAT_MAX + 1, flat, small_patches).patches == "float16"  # within budget
    explicit = choose_storage(10, flat, big_patches, vector_dtype="float16", patches="float16")
    assert (explicit.vectors, explicit.patches) == ("float16", "float16")


# ---------------------------------------------------------------- what a product costs, per file


def test_size_report_per_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    catalog = read_catalog(make_index_catalog(tmp_path / "catalog", 10))
    result = build_index(catalog, PatchFixtureEncoder(), tmp_path / "index", threads=2)
    sizes = version_sizes(result.version_dir)
    on_disk = {p.name: p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
               for p in result.version_dir.iterdir()}  # fmt: skip
    assert set(sizes["files"]) == set(on_disk) == {
        "manifest.json", "products.sqlite", "labels.npy", "text_vectors.npy", "image_vectors.npy", "patches.npy", "lexical",
    }  # fmt: skip
    assert sizes["files"]["lexical"]["bytes"] > 0  # the BM25 index's folder, counted as one entry
    for name, row in sizes["files"].items():
        assert row["bytes"] == on_disk[name] and row["bytes_per_product"] == pytest.approx(on_disk[name] / 10)
    assert sizes["total_bytes"] == sum(on_disk.values()) and sizes["products"] == 10
    dim = FixtureEncoder().dim
    assert sizes["files"]["text_vectors.npy"]["bytes"] == 128 + 10 * dim * 4  # .npy header + float32 rows, once
    assert sizes["files"]["patches.npy"]["bytes"] == 128 + 10 * 6 * 4 * 2

    from indexer import cli

    parser = argparse.ArgumentParser(prog="vitrine")
    cli.register(parser.add_subparsers(dest="command", required=True))
    for argv in (["index", "--du", "--out", str(tmp_path / "index")], ["index", "--du", "--json", "--out", str(tmp_path / "index")]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    text, as_json = capsys.readouterr().out.split("\n{", 1)
    assert "patches.npy" in text and "B/product" in text and "10 products" in text
    assert json.loads("{" + as_json)["files"]["labels.npy"]["bytes"] == on_disk["labels.npy"]


# ---------------------------------------------------------------- vectors stored once


def _as_format_1(version: Path) -> None:
    """Rewrite a format-2 flat version the way format 1 stored it: float32 vectors and the flat .faiss files."""
    manifest = read_manifest(version)
    spec = faiss_index.IndexSpec.from_dict(manifest.index)
    labels = np.load(version / "labels.npy")
    for name in ("text", "image"):
        vectors = np.load(version / f"{name}_vectors.npy").astype(np.float32)
        faiss_index.write(faiss_index.build(spec, vectors, labels), version / f"{name}.faiss")
    raw = manifest.model_dump(mode="json")
    raw.pop("storage")
    raw["format_version"] = 1
    raw["files"].update(text_index="text.faiss", image_index="image.faiss")
    (version / "manifest.json").write_text(json.dumps(raw))


def _results(index: ProductIndex, encoder: FixtureEncoder) -> list:
    queries = encoder.encode_texts(QUERIES)
    return [index.search(q, k=8, filters=f) for q in queries for f in FILTERS]


def test_vectors_stored_once_search_identically_and_format_1_still_loads(tmp_path: Path) -> None:
    encoder = FixtureEncoder()
    catalog = read_catalog(make_index_catalog(tmp_path / "catalog", 32))
    new = build_index(catalog, encoder, tmp_path / "new", index_type="flat", threads=2).version_dir
    assert not list(new.glob("*.faiss")) and read_manifest(new).storage.faiss_files is False
    old_root = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old_root)
    old = old_root / "versions" / new.name
    _as_format_1(old)
    assert read_manifest(old).storage is None and read_manifest(old).format_version == 1
    with ProductIndex.open(tmp_path / "new") as stored_once, ProductIndex.open(old_root) as format_1:
        assert _results(stored_once, encoder) == _results(format_1, encoder)  # hits, scores and order: identical
        ids = stored_once.ids()[:5]
        for a, b in zip(stored_once.vectors(ids), format_1.vectors(ids)):
            np.testing.assert_array_equal(a, b)
    # an upsert of a format-1 version keeps its storage (and its .faiss files)
    more = read_catalog(make_index_catalog(tmp_path / "more", 4, start=40))
    upserted = upsert_index(old_root, more, encoder, threads=2)
    assert upserted.manifest.storage.faiss_files and (upserted.version_dir / "text.faiss").is_file()
    with ProductIndex.open(old_root) as index:
        assert len(index) == 36


def test_float16_vectors_keep_the_ranking(tmp_path: Path) -> None:
    encoder = FixtureEncoder()
    catalog = read_catalog(make_index_catalog(tmp_path / "catalog", 32))
    build_index(catalog, encoder, tmp_path / "f32", index_type="flat", threads=2)
    f16 = build_index(catalog, encoder, tmp_path / "f16", index_type="hnsw", vector_dtype="float16", threads=2)
    assert np.load(f16.version_dir / "text_vectors.npy").dtype == np.float16
    with ProductIndex.open(tmp_path / "f32") as a, ProductIndex.open(tmp_path / "f16") as b:
        for hits_a, hits_b in zip(_results(a, encoder), _results(b, encoder)):
            assert [h.id for h in hits_a] == [h.id for h in hits_b]
            np.testing.assert_allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=2e-3)
        from indexer.qdrant_index import QdrantEngine, QdrantIndex

        with QdrantIndex.open(tmp_path / "f16", engine=QdrantEngine.embedded(":memory:"), exact=True) as qdrant:
            for query in encoder.encode_texts(QUERIES):  # both engines read the same float16 values
                assert qdrant.search(query, k=8) == b.search(query, k=8)


# ---------------------------------------------------------------- compact patches


def test_patch_codec_round_trip() -> None:
    rng = np.random.default_rng(0)
    # patches of rank 6 in 32 channels, plus a little noise: 8 components keep almost everything
    basis = rng.standard_normal((6, 32)).astype(np.float32)
    patches = (rng.standard_normal((300, 5, 6)).astype(np.float32) @ basis + 0.01 * rng.standard_normal((300, 5, 32))).astype(np.float16)
    codec = PatchCodec.fit(patches, 8)
    codes, scales = codec.encode(patches)
    assert codes.dtype == np.int8 and codes.shape == (300, 5, 8) and scales.shape == (300,)
    original = patches.astype(np.float32)

    def relative_error(codec: PatchCodec) -> float:
        return float(np.linalg.norm(codec.decode(*codec.encode(patches)) - original) / np.linalg.norm(original))

    assert relative_error(codec) < 0.02
    assert codec.bytes_per_product(5) == 5 * 8 + 2
    # too few components lose what the data holds: the error says so
    assert relative_error(PatchCodec.fit(patches, 2)) > 10 * relative_error(codec)


def test_compact_patches_in_an_index_round_trip_through_upsert_and_delete(tmp_path: Path) -> None:
    encoder = PatchFixtureEncoder()
    catalog = read_catalog(make_index_catalog(tmp_path / "catalog", 16))
    first, rest = catalog.products[:10], catalog.products[10:]
    built = build_index(first, encoder, tmp_path / "index", patch_storage="pca-int8", threads=2)
    assert {"patch_codes.npy", "patch_scales.npy", "patch_basis.npz"} <= {p.name for p in built.version_dir.iterdir()}
    assert not (built.version_dir / "patches.npy").exists()
    basis = (built.version_dir / "patch_basis.npz").read_bytes()
    upsert_index(tmp_path / "index", rest, encoder, threads=2)
    final = delete_from_index(tmp_path / "index", ["101", "108"])
    assert (final.version_dir / "patch_basis.npz").read_bytes() == basis  # later versions keep the first basis
    with ProductIndex.open(tmp_path / "index") as index:
        ids = index.ids()
        assert sorted(ids) == sorted(p.id for p in catalog.products if p.id not in ("101", "108"))
        by_id = {p.id: p for p in catalog.products}
        _, expected = encoder.encode_images_with_patches([by_id[i].image.open() for i in ids])
        got = index.patches(ids)
        assert got.dtype == np.float32 and got.shape == expected.shape
        # int8 codes with one scale per product: within 1/127 of each product's largest coefficient
        np.testing.assert_allclose(got, expected, atol=0.02 * float(np.abs(expected).max()))
        assert index.patches([]).shape == (0, 6, 4)
        from indexer.qdrant_index import QdrantEngine, QdrantIndex

        with QdrantIndex.open(tmp_path / "index", engine=QdrantEngine.embedded(":memory:")) as qdrant:  # the other backend
            np.testing.assert_array_equal(qdrant.patches(ids), got)
            query = encoder.encode_texts(QUERIES[:1])[0]
            assert qdrant.search(query, k=5) == index.search(query, k=5)

