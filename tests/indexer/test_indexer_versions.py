"""Index versions on disk: partial folders of killed builds are cleaned, `vitrine index --gc`, and
versions a reader (a serving process) has open are never pruned (issue 14, part 1; the service's
own lease is tested in tests/search/test_service_hardening.py).

Killed builds and killed readers are real processes, SIGKILLed mid-way.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from indexer import ProductIndex
from indexer.build import build_index, delete_from_index, upsert_index
from indexer.layout import IndexBusyError, IndexLayout, is_leased
from tests.support.indexes import FixtureEncoder, fixture_product, make_index_catalog
from vitrine.catalog import read_catalog

REPO = Path(__file__).resolve().parents[2]


def run_index(argv: list[str]) -> int:
    """`vitrine index ...`, parsed by the indexer's own command registration."""
    from indexer import cli

    parser = argparse.ArgumentParser(prog="vitrine")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["index", *argv])
    return args.func(args)


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    return make_index_catalog(tmp_path / "catalog", records=[fixture_product(i) for i in range(12)])


def build(catalog: Path, out: Path, keep_versions: int = 1) -> Path:
    return build_index(read_catalog(catalog), FixtureEncoder(), out, keep_versions=keep_versions, threads=1).version_dir


@contextmanager
def python_process(script: str, ready: Path) -> Iterator[subprocess.Popen]:
    """A Python child running `script` (with the repository importable), once it has created `ready`;
    SIGKILLed on exit if still alive."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if child.poll() is not None:
                raise RuntimeError(f"child exited with {child.returncode}: {child.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "child never got ready"
            time.sleep(0.05)
        yield child
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stderr.close()


def partials(out: Path) -> list[Path]:
    return sorted((out / "versions").glob("*.partial"))


def test_a_killed_build_leaves_a_partial_folder_that_the_next_writer_and_gc_remove(tmp_path, catalog, capsys):
    out = tmp_path / "index"
    live = build(catalog, out)
    ready = tmp_path / "embedding-started"
    script = f"""
        import time
        from pathlib import Path
        from indexer.build import build_index
        from tests.support.indexes import FixtureEncoder
        from vitrine.catalog import read_catalog

        class Stuck(FixtureEncoder):
            def encode_images(self, images):
                Path({str(ready)!r}).touch()  # the staging folder exists and holds the store's work
                time.sleep(600)

        build_index(read_catalog({str(catalog)!r}), Stuck(), {str(out)!r}, threads=1)
    """
    with python_process(script, ready) as writer:
        assert len(partials(out)) == 1  # the live writer's folder
        with pytest.raises(IndexBusyError):
            run_index(["--gc", "--out", str(out)])  # never under a live writer
        assert len(partials(out)) == 1
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    stale = partials(out)
    assert len(stale) == 1 and IndexLayout(out).current() == live

    assert run_index(["--gc", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"removed {stale[0]}" in printed and f"live version {live.name}" in printed
    assert partials(out) == [] and IndexLayout(out).current() == live

    # a writer starting up removes such leftovers itself
    (out / "versions" / "20000101T000000000000Z.partial").mkdir()
    delete_from_index(out, ["100"], keep_versions=1)
    assert partials(out) == []


def test_gc_removes_old_versions_nobody_reads_and_reports_them(tmp_path, catalog, capsys):
    out = tmp_path / "index"
    versions = [build(catalog, out, keep_versions=5) for _ in range(3)]
    assert IndexLayout(out).finished_versions() == versions
    (out / "CURRENT.tmp").write_text("left by a writer killed while switching\n")
    assert run_index(["--gc", "--out", str(out), "--keep-versions", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(r["path"] for r in report["removed"]) == sorted([*map(str, versions[:2]), str(out / "CURRENT.tmp")])
    assert report["removed_bytes"] > 0 and report["kept_leased"] == []
    assert IndexLayout(out).finished_versions() == versions[2:] and IndexLayout(out).current() == versions[2]
    with ProductIndex.open(out) as index:
        assert len(index) == 12


def test_a_leased_version_survives_pruning_until_it_is_released(tmp_path, catalog):
    out = tmp_path / "index"
    first = build(catalog, out)
    encoder = FixtureEncoder()
    query = encoder.encode_texts(["red tshirts"])[0]
    with ProductIndex.open(out) as index:
        assert index.version_dir == first and is_leased(first)
        expected = index.search(query, k=5)
        upsert_index(out, read_catalog(catalog), encoder, keep_versions=1)  # nothing changed: no new version
        second = build(catalog, out, keep_versions=1)
        third = build(catalog, out, keep_versions=1)
        layout = IndexLayout(out)
        assert layout.finished_versions() == [first, third] and not second.exists()  # second was not leased
        assert index.search(query, k=5) == expected and index.get("105") is not None  # still readable
    assert not is_leased(first)
    assert IndexLayout(out).gc(keep=1).removed_paths == [first]
    assert IndexLayout(out).finished_versions() == [third]


def test_a_killed_reader_holds_no_lease(tmp_path, catalog):
    out = tmp_path / "index"
    first = build(catalog, out)
    ready = tmp_path / "reader-open"
    script = f"""
        import time
        from pathlib import Path
        from indexer import ProductIndex

        index = ProductIndex.open({str(out)!r})
        Path({str(ready)!r}).touch()
        time.sleep(600)
    """
    with python_process(script, ready) as reader:
        build(catalog, out, keep_versions=1)
        assert first.exists() and is_leased(first)
        reader.send_signal(signal.SIGKILL)
        reader.wait(timeout=30)
    assert not is_leased(first)  # the kernel dropped the dead reader's lock: nothing to go stale
    cleanup = IndexLayout(out).gc(keep=1)
    assert cleanup.removed_paths == [first] and cleanup.leased == []


def test_prune_reports_leased_versions_it_kept(tmp_path, catalog):
    out = tmp_path / "index"
    first = build(catalog, out)
    with ProductIndex.open(out):
        build(catalog, out, keep_versions=1)
        cleanup = IndexLayout(out).gc(keep=1)
        assert cleanup.leased == [first] and cleanup.removed == [] and first.exists()


def test_version_names_sort_in_time_order_across_a_second_boundary(tmp_path, monkeypatch) -> None:
    """Seconds and microseconds come from one clock read: 0.999999 s then 1.000001 s must sort in that order."""
    layout = IndexLayout(tmp_path / "index")
    clock = iter([1_700_000_000_999_999_000, 1_700_000_001_000_001_000])
    monkeypatch.setattr(time, "time_ns", lambda: next(clock))
    first, second = layout._new_name(), layout._new_name()
    assert first == "20231114T221320999999Z" and second == "20231114T221321000001Z"
    assert sorted([second, first]) == [first, second]
