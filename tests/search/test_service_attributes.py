"""Backfilled attribute values through the API: provenance on results and products, include_predicted."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from indexer import ProductIndex
from indexer.backfill import rewrite_store
from search.service import Settings, create_app
from tests.support.indexes import build_fixture_index, fixture_product, make_index_catalog
from tests.support.service import jpeg_bytes

N = 24
GAPS = {2: ("gender", "Men", 0.93), 5: ("gender", "Men", 0.41), 8: ("baseColour", "Red", 0.88)}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    """An index whose products 2, 5 and 8 lack a catalog value, backfilled by hand (the heads' own test
    is tests/indexer/test_indexer_backfill.py): here only what the API makes of stored predictions counts."""
    root = tmp_path_factory.mktemp("service-attributes")
    records = [fixture_product(i) for i in range(N)]
    for i, (name, _, _) in GAPS.items():
        del records[i][name]
    fixture = build_fixture_index(root, catalog_dir=make_index_catalog(root / "catalog", records=records))

    def edit(store, folder, previous) -> dict:
        store.put_predicted([(str(100 + i), name, value, conf) for i, (name, value, conf) in GAPS.items()])
        return {}

    rewrite_store(fixture.index_dir, edit, operation="backfill")
    with ProductIndex.open(fixture.index_dir) as index:
        app = create_app(Settings(max_k=50, default_k=10), index=index, encoder=fixture.encoder)
        with TestClient(app, raise_server_exceptions=False) as test_client:
            yield test_client


def _search(client: TestClient, **body) -> dict:
    response = client.post("/search/text", json={"query": "men shirts", "k": 50, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_results_and_products_carry_predicted_values_with_provenance(client):
    results = {r["id"]: r for r in _search(client)["results"]}
    assert results["102"]["predicted"] == {"gender": {"value": "Men", "source": "predicted", "confidence": 0.93}}
    assert "gender" not in results["102"]["attributes"]
    assert results["108"]["predicted"]["baseColour"]["source"] == "predicted"
    assert results["100"]["predicted"] == {}
    product = client.get("/products/105").json()
    assert product["predicted"] == {"gender": {"value": "Men", "source": "predicted", "confidence": 0.41}}


def test_filters_match_predicted_values_only_with_include_predicted(client):
    catalog_men = {str(100 + i) for i in range(N) if i not in GAPS and fixture_product(i)["gender"] == "Men"}
    plain = {r["id"] for r in _search(client, filters={"gender": "Men"})["results"]}
    assert plain == catalog_men
    widened = _search(client, filters={"gender": "men"}, include_predicted=True)["results"]
    assert {r["id"] for r in widened} == catalog_men | {"102", "105"}
    for result in widened:  # each match is explained by a catalog value or a marked prediction
        assert result["attributes"].get("gender") == "Men" or result["predicted"]["gender"]["value"] == "Men"
    # Without filters the flag changes nothing.
    assert _search(client)["results"] == _search(client, include_predicted=True)["results"]


def test_image_search_takes_include_predicted_as_a_form_field(client, tmp_path):
    files = {"image": ("q.jpg", jpeg_bytes((200, 30, 30)), "image/jpeg")}
    data = {"k": "50", "filters": '{"baseColour": "Red"}', "include_predicted": "true"}
    response = client.post("/search/image", files=files, data=data)
    assert response.status_code == 200, response.text
    assert "108" in {r["id"] for r in response.json()["results"]}
    data["include_predicted"] = "yes"  # booleans are strict
    assert client.post("/search/image", files=files, data=data).status_code == 422


def test_include_predicted_must_be_a_boolean(client):
    response = client.post("/search/text", json={"query": "men", "include_predicted": "sometimes"})
    assert response.status_code == 422 and response.json()["error"]["code"]


def test_redis_records_keep_predicted_values_and_read_older_ones():
    import json

    from search.service.redis_store import record_from_json, record_to_json
    from vitrine.catalog.record import ProductRecord

    record = ProductRecord("1", "t", "c", "s", "", {"gender": "Men"}, "img", {"baseColour": {"value": "Red", "confidence": 0.8}})
    assert record_from_json(record_to_json(record)) == record
    older = {k: v for k, v in record.to_dict().items() if k != "predicted"}  # cached before backfill existed
    assert record_from_json(json.dumps(older).encode()).predicted == {}
    bad = {**record.to_dict(), "predicted": {"baseColour": "Red"}}
    assert record_from_json(json.dumps(bad).encode()) is None
