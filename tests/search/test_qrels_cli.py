"""`vitrine eval --qrels FILE --queries FILE --index DIR`: the live search pipeline on hand-written judgments."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer import ProductIndex
from search.qrels import Pipeline
from tests.support.indexes import IndexFixture
from tests.support.service import build_bundle_index
from vitrine.cli import main
from vitrine.evaluation.qrels import read_qrels, score_run

pytestmark = pytest.mark.torch

QRELS = """\
q1 0 107 2
q1 0 115 1
q2 0 104 1
q2 0 not-in-index 1
q3 0 101 0
"""
QUERIES = '{"_id": "q1", "text": "no 7"}\n{"_id": "q2", "text": "women jeans no 4"}\n{"_id": "q3", "text": "anything"}\n'


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> IndexFixture:
    return build_bundle_index(tmp_path_factory.mktemp("qrels"), tiny_bundle, n=24)


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "qrels.txt").write_text(QRELS)
    (tmp_path / "queries.jsonl").write_text(QUERIES)
    return {"qrels": tmp_path / "qrels.txt", "queries": tmp_path / "queries.jsonl", "out": tmp_path / "out"}


def read_run(path: Path) -> dict[str, list[str]]:
    run: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        qid, _, doc, rank, _, _ = line.split()
        run.setdefault(qid, []).append(doc)
        assert int(rank) == len(run[qid])
    return run


def test_every_mode_is_scored_from_the_pipeline_s_own_rankings(built, files, capsys):
    code = main(["eval", "--qrels", str(files["qrels"]), "--queries", str(files["queries"]), "--index", str(built.index_dir),
                 "--modes", "vector,lexical,hybrid", "--depth", "20", "--out", str(files["out"])])  # fmt: skip
    assert code == 0
    report = json.loads((files["out"] / "metrics.json").read_text())
    assert list(report["modes"]) == ["vector", "lexical", "hybrid"] and "| lexical |" in capsys.readouterr().out
    assert report["counts"]["judged_documents_not_in_index"] == 1
    pipeline = Pipeline.open(built.index_dir)
    try:
        for mode, entry in report["modes"].items():
            run = read_run(files["out"] / f"run.{mode}.trec")
            assert run == {"q1": pipeline.search("no 7", mode, 20), "q2": pipeline.search("women jeans no 4", mode, 20)}
            assert entry["metrics"] == pytest.approx(score_run(run, read_qrels(files["qrels"]), recall_ks=(10, 20)).metrics)
            assert entry["counts"]["queries_scored"] == 2  # q3 has no relevant judgment
    finally:
        pipeline.close()
    lexical = report["modes"]["lexical"]["per_query"]
    with ProductIndex.open(built.index_dir) as index:
        assert index.lexical_search("no 7", k=1)[0].id == "107"
    assert lexical["q1"]["mrr"] == 1.0 and lexical["q2"]["recall@20"] == 0.5  # one of q2's two is not in the index


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--modes", "lexical+rerank"], "has no reranker"),
        (["--depth", "5000"], "at most 1000"),
        (["--encoder", "tests.support.encoders:ColourHashEncoder"], "use --bundle"),
    ],
)
def test_bad_options_are_one_clear_error(built, files, capsys, extra, message):
    args = ["eval", "--qrels", str(files["qrels"]), "--queries", str(files["queries"]), "--index", str(built.index_dir),
            "--out", str(files["out"]), *extra]  # fmt: skip
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_judged_options_need_each_other(built, files, capsys):
    assert main(["eval", "--qrels", str(files["qrels"]), "--queries", str(files["queries"]), "--out", str(files["out"])]) == 2
    assert "--qrels needs --index" in capsys.readouterr().err
    assert main(["eval", "--queries", str(files["queries"]), "--catalog", "x", "--bundle", "y", "--out", str(files["out"])]) == 2
    assert "judged queries need --qrels" in capsys.readouterr().err
    assert main(["eval", "--index", str(built.index_dir), "--out", str(files["out"])]) == 2
    assert "give --qrels FILE --queries FILE too" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: exit status 2, usage on stderr
        main(["eval", "--qrels", str(files["qrels"]), "--modes", "bm25", "--out", str(files["out"])])
    assert "choose from vector,lexical,hybrid" in capsys.readouterr().err
