"""`vitrine serve --backend qdrant`: the service on the Qdrant engine answers as on Faiss, and two
replicas on one Qdrant (and one Redis) answer alike.

Local mode locks its folder to one process, so replicas here share the engine in two ways: two
apps on one in-process engine (what two replicas on one Qdrant server see), and two live servers
each opening its own copy of the loaded folder (what replicas shipping a snapshot see).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from indexer import ProductIndex, QdrantEngine, QdrantIndex
from indexer.qdrant_index import load_version
from search.service import Settings, create_app
from search.service import cli as serve_cli
from tests.support.indexes import IndexFixture, build_fixture_index
from tests.support.redis_server import free_port
from tests.support.service import LiveServer, jpeg_bytes

QUERIES = ["red tshirts", "women blue jeans", "black handbags", "green", "men sport shoes", "yellow soft jeans"]
FILTERS = [None, {"gender": "Women"}, {"baseColour": ["red", "Pink"]}, {"subcategory": "Shoes", "gender": "men"}]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("service-qdrant"), n=40)


def answers(client: TestClient | httpx.Client) -> list:
    """Ids and scores of every query x filter, photo queries, a product and the filter fields."""
    out = []
    for query in QUERIES:
        for filters in FILTERS:
            response = client.post("/search/text", json={"query": query, "k": 8, "filters": filters})
            assert response.status_code == 200, response.text
            out.append([(r["id"], r["score"], r["parts"]) for r in response.json()["results"]])
    for colour in ((200, 30, 30), (40, 90, 200)):
        response = client.post("/search/image", files={"image": ("q.jpg", jpeg_bytes(colour), "image/jpeg")}, data={"k": "6"})
        assert response.status_code == 200, response.text
        out.append([(r["id"], r["score"], r["parts"]) for r in response.json()["results"]])
    out.append(client.get("/products/105").json())
    out.append(client.get("/filters").json())
    return out


def test_backend_settings_and_serve_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().backend == "faiss"
    assert Settings(backend="qdrant", qdrant_url="http://qdrant:6333").qdrant_url == "http://qdrant:6333"
    assert Settings(qdrant_url="http://qdrant:6333").backend == "faiss"  # ignored: one variable switches engines
    for bad in ({"backend": "qdrant", "qdrant_url": "http://q:6333", "qdrant_path": tmp_path}, {"backend": "milvus"},
                {"backend": "qdrant", "qdrant_collection": "a/b"}):  # fmt: skip
        with pytest.raises(ValidationError):
            Settings(**bad)
    secret = Settings(backend="qdrant", qdrant_url="http://q:6333", qdrant_api_key="s3cret")
    assert "s3cret" not in repr(secret) and secret.qdrant_api_key.get_secret_value() == "s3cret"
    monkeypatch.setenv("VITRINE_BACKEND", "qdrant")
    monkeypatch.setenv("VITRINE_QDRANT_PATH", str(tmp_path))
    assert Settings().backend == "qdrant" and Settings().qdrant_path == tmp_path

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    captured = {}
    monkeypatch.setattr(serve_cli, "run_server", lambda overrides, log_level: captured.update(overrides) or 0)
    args = parser.parse_args(["serve", "--index", "I", "--backend", "qdrant", "--qdrant-path", str(tmp_path)])
    assert args.func(args) == 0
    assert captured == {"index": Path("I"), "backend": "qdrant", "qdrant_path": tmp_path}
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--backend", "milvus"])


def test_the_service_on_embedded_qdrant_answers_as_on_faiss(fixture: IndexFixture, tmp_path: Path) -> None:
    faiss_app = create_app(Settings(index=fixture.index_dir), encoder=fixture.encoder)
    qdrant_app = create_app(Settings(index=fixture.index_dir, backend="qdrant", qdrant_path=tmp_path / "q"), encoder=fixture.encoder)
    with TestClient(faiss_app) as on_faiss, TestClient(qdrant_app, raise_server_exceptions=False) as on_qdrant:
        assert isinstance(qdrant_app.state.engine.index, QdrantIndex)
        assert answers(on_qdrant) == answers(on_faiss)
        # Bad input is the same 4xx JSON error on either engine.
        for body, code in (({"query": "red", "filters": {"colour": "red"}}, "unknown_filter"),
                           ({"query": "red", "filters": {"gender": []}}, "validation_error")):  # fmt: skip
            got, expected = on_qdrant.post("/search/text", json=body), on_faiss.post("/search/text", json=body)
            assert got.status_code == expected.status_code == 422 and got.json() == expected.json()
            assert got.json()["error"]["code"] == code
    # The app opened the embedded engine, so it closed it at shutdown: the folder is free again.
    QdrantEngine.embedded(tmp_path / "q").close()


def test_two_replicas_on_one_qdrant_and_one_redis_answer_alike(fixture: IndexFixture, tmp_path: Path, redis_server) -> None:
    engine = QdrantEngine.embedded(tmp_path / "shared")  # one engine, as one Qdrant server for both replicas
    settings = Settings(index=fixture.index_dir, backend="qdrant", redis_url=redis_server.url, redis_timeout_s=0.2)
    first = QdrantIndex.open(fixture.index_dir, engine=engine)
    second = QdrantIndex.open(fixture.index_dir, engine=engine, load=False)  # a replica only checks the collection
    try:
        apps = [create_app(settings, index=index, encoder=fixture.encoder) for index in (first, second)]
        with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
            assert a.get("/readyz").json()["status"] == b.get("/readyz").json()["status"] == "ready"
            assert answers(a) == answers(b)
            fresh = {"query": "brown retro handbags", "k": 5}
            first_answer = a.post("/search/text", json=fresh).json()
            second_answer = b.post("/search/text", json=fresh).json()
            assert (first_answer["cache"], second_answer["cache"]) == ("miss", "redis")  # b reads a's embedding
            assert first_answer["results"] == second_answer["results"]
    finally:
        first.close()
        second.close()
        engine.close()


def test_two_served_replicas_on_copies_of_one_loaded_folder(fixture: IndexFixture, tmp_path: Path, redis_server) -> None:
    engine = QdrantEngine.embedded(tmp_path / "loaded")
    load_version(engine, ProductIndex.live_version(fixture.index_dir))  # as `vitrine index --qdrant-load --qdrant-path`
    engine.close()
    servers = []
    for name in ("replica-a", "replica-b"):
        shutil.copytree(tmp_path / "loaded", tmp_path / name)
        settings = Settings(index=fixture.index_dir, backend="qdrant", qdrant_path=tmp_path / name, redis_url=redis_server.url)
        servers.append(LiveServer(create_app(settings, encoder=fixture.encoder)).start())
    try:
        with httpx.Client(base_url=servers[0].url) as a, httpx.Client(base_url=servers[1].url) as b:
            first = answers(a)
            assert first == answers(b)
            assert first[0] and first[-1]["fields"]["gender"] == ["Men", "Unisex", "Women"]
    finally:
        for server in servers:
            server.stop()


def test_an_unreachable_qdrant_is_a_503_not_a_500(fixture: IndexFixture) -> None:
    index = QdrantIndex.open(fixture.index_dir, engine=QdrantEngine.embedded(":memory:"))
    index.engine = QdrantEngine.connect(f"http://127.0.0.1:{free_port()}", prefer_grpc=False, timeout_s=2)  # the server went away
    try:
        with TestClient(create_app(Settings(), index=index, encoder=fixture.encoder), raise_server_exceptions=False) as client:
            response = client.post("/search/text", json={"query": "red tshirts"})
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "index_unavailable"
            assert client.get("/products/105").status_code == 200  # records come from the version's store
    finally:
        index.close()


def test_embedded_in_memory_needs_no_folder(fixture: IndexFixture) -> None:
    """VITRINE_QDRANT_PATH=:memory: loads the live version at each start (seconds) and writes nothing."""
    app = create_app(Settings(index=fixture.index_dir, backend="qdrant", qdrant_path=":memory:"), encoder=fixture.encoder)
    with TestClient(app) as client:
        assert app.state.engine.index.engine.location == ":memory:"
        assert [r["id"] for r in client.post("/search/text", json={"query": "red tshirts", "k": 3}).json()["results"]]
    assert not (fixture.index_dir / "qdrant").exists() and not Path(":memory:").exists()
