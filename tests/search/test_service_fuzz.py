"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis + Hypothesis).

A real uvicorn server, configured as `vitrine serve` runs it, serves the fixture index. For every
operation, schema-valid (positive) and schema-violating (negative) requests are generated with a
fixed seed and a bounded count. Condition: no 5xx, no response slower than 5 s, every error is
JSON in the service's error shape, and responses conform to the schema (status codes, content
types, bodies). The catalog writes are fuzzed with an API key, so they reach their validation.
"""
from __future__ import annotations

import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance

from indexer import ProductIndex
from search.service import Settings, create_app
from search.service.auth import key_digest
from search.service.connections import server_options
from tests.support.indexes import IndexFixture, build_fixture_index
from tests.support.service import LiveServer

SEED = 1
EXAMPLES_PER_OPERATION = {GenerationMode.POSITIVE: 120, GenerationMode.NEGATIVE: 80}
WRITE_EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 60}  # each write that passes validation commits
WRITE_KEY = "fuzz-write-key-0123456789abcdef"
WRITES = {("PUT", "/products/{product_id}"), ("DELETE", "/products/{product_id}"), ("POST", "/products:batch")}
MAX_RESPONSE_S = 5.0
LIMITS = dict(max_k=50, default_k=10, max_query_chars=128, max_image_bytes=256 * 1024, max_body_bytes=512 * 1024)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("service-fuzz"), n=24)


@pytest.fixture(scope="module")
def server(fixture: IndexFixture):
    settings = Settings(**LIMITS, write_keys={"fuzz": key_digest(WRITE_KEY)}, write_max_rows=20)
    with ProductIndex.open(fixture.index_dir) as index:
        app = create_app(settings, index=index, encoder=fixture.encoder)
        with LiveServer(app, **server_options(settings)) as live:
            yield live


def test_generated_requests_never_get_a_5xx_or_a_slow_answer(server: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    statuses: Counter[int] = Counter()
    slowest = 0.0
    started = time.perf_counter()
    session = requests.Session()
    skipped: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/search/text", "/search/image", "/products/{product_id}", "/filters"}
    assert {(op.method.upper(), op.path) for op in operations} >= WRITES

    for operation in operations:
        # Writes are sent with the API key (without one they would all stop at the 401).
        is_write = (operation.method.upper(), operation.path) in WRITES
        headers = {"Authorization": f"Bearer {WRITE_KEY}"} if is_write else None
        for mode, examples in (WRITE_EXAMPLES if is_write else EXAMPLES_PER_OPERATION).items():

            @seed(SEED)
            @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                      phases=[Phase.explicit, Phase.generate, Phase.shrink])  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode))
            def request_is_answered_well(case: schemathesis.Case) -> None:
                nonlocal slowest
                sent = time.perf_counter()
                response = case.call(base_url=server.url, session=session, timeout=2 * MAX_RESPONSE_S, headers=headers)
                took = time.perf_counter() - sent
                slowest = max(slowest, took)
                statuses[response.status_code] += 1
                assert took < MAX_RESPONSE_S, f"{case.method} {case.path}: {took:.1f} s"
                assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
                if response.status_code >= 400:
                    content_type = response.headers.get("content-type", [""])[0]  # schemathesis: name -> values
                    assert content_type.startswith("application/json"), response.text[:300]
                    assert {"code", "message"} <= set(response.json()["error"]), response.text[:300]
                case.validate_response(response, checks=CHECKS)

            try:
                request_is_answered_well()
            except Unsatisfiable:
                # Nothing to violate (an operation without parameters or body): no negative cases exist.
                assert mode is GenerationMode.NEGATIVE and not operation.body and not operation.path_parameters, operation.label
                skipped.append(f"{operation.label} ({mode})")

    seconds = time.perf_counter() - started
    total = sum(statuses.values())
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    print(f"\nfuzz: {len(operations)} operations, {total} requests in {seconds:.1f} s, slowest {slowest * 1000:.0f} ms, "
          f"5xx {server_errors}, statuses {dict(sorted(statuses.items()))}, no negative cases for {skipped}")  # fmt: skip
    assert server_errors == 0 and total >= 200
