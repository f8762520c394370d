"""A bounded background load on a live server: a few clients, a request budget and a time limit.

    with BoundedLoad(server.url, requests=300, clients=4, ids=["100", "101"]) as load:
        ...                                # change the index meanwhile
    assert load.failures == [] and load.done == 300

Every request must answer 200 (a search, a product that is never changed by the test); anything
else (an error status, a connection error, a timeout) is a failure, kept with what went wrong.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import httpx

QUERIES = ("red tshirts", "women blue jeans", "green handbags", "black casual shoes", "soft pink tops", "men urban jeans")


@dataclass
class BoundedLoad:
    url: str
    requests: int = 300
    clients: int = 4
    ids: list[str] = field(default_factory=list)  # products the test leaves alone: GET /products/{id} must stay 200
    max_s: float = 120.0
    pause_s: float = 0.0  # between a client's requests: spreads the budget over time
    timeout_s: float = 10.0
    done: int = 0
    failures: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._next = itertools.count()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        self._deadline = 0.0
        self.seconds = 0.0

    def _client(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as http:
            while time.monotonic() < self._deadline:
                i = next(self._next)
                if i >= self.requests:
                    return
                started = time.perf_counter()
                try:
                    if self.ids and i % 3 == 2:
                        response = http.get(f"/products/{self.ids[i % len(self.ids)]}")
                    else:
                        response = http.post("/search/text", json={"query": QUERIES[i % len(QUERIES)], "k": 5})
                    ok = response.status_code == 200 and (response.json().get("results") != [] if i % 3 != 2 else True)
                    problem = None if ok else f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    problem = f"request {i}: {type(exc).__name__}: {exc}"
                took = time.perf_counter() - started
                with self._lock:
                    self.done += 1
                    self.latencies_s.append(took)
                    if problem:
                        self.failures.append(problem)
                if self.pause_s:
                    time.sleep(self.pause_s)

    def start(self) -> BoundedLoad:
        self._started = time.perf_counter()
        self._deadline = time.monotonic() + self.max_s
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> BoundedLoad:
        """End the load now (the requests in flight finish), then wait for it."""
        self._deadline = 0.0
        return self.wait()

    def wait(self) -> BoundedLoad:
        for thread in self._threads:
            thread.join(timeout=self.max_s + 2 * self.timeout_s)
        self.seconds = time.perf_counter() - self._started
        return self

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def __enter__(self) -> BoundedLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.wait()

    def p(self, q: float) -> float:
        """The q-quantile of request latency, in ms."""
        ordered = sorted(self.latencies_s)
        return 1000.0 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def wait_until(condition, timeout_s: float, poll_s: float = 0.05) -> float | None:
    """Seconds until `condition()` is true, or None after `timeout_s`."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if condition():
            return time.perf_counter() - started
        time.sleep(poll_s)
    return None
