"""bgem3_lib.analysis.static_widgets and book/_static/bgem3_widgets.js: the numbers the book's static weight
explorer computes in the browser (the script run by node here) equal bgem3_lib's at the same weights."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_weight_search import VOCAB, _encodings, _random_qrels

from bgem3_lib.analysis.static_widgets import (
    encode_set,
    explorer_payload,
    image_switcher_html,
    python_values,
    weight_explorer_html,
)
from bgem3_lib.analysis.weight_search import judgements, score_candidates
from bgem3_lib.retrieval.retriever import HybridRetriever

SCRIPT = Path(__file__).resolve().parents[2] / "book" / "_static" / "bgem3_widgets.js"
WEIGHTS = [(1.0, 0.3, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.35, 0.05, 0.6), (0.5, 0.5, 0.0),
           (0.15, 0.5, 0.35), (0.2, 0.8, 0.0), (0.05, 0.95, 0.0), (0.9, 0.1, 0.05)]
METRICS = ("ndcg@10", "recall@20", "ndcg@3", "recall@5")


@pytest.fixture(scope="module")
def data():
    out = {}
    for seed, (n_docs, n_q) in enumerate([(60, 9), (35, 6)]):
        rng = np.random.default_rng(100 + seed)
        corpus, queries = _encodings(rng, n_docs), _encodings(rng, n_q, tokens=(1, 4))
        cs = score_candidates(HybridRetriever(corpus, vocab_size=VOCAB), queries, depth=6 + 10 * seed)
        qids, docids = [f"q{i}" for i in range(n_q)], [f"d{j}" for j in range(n_docs)]
        out["set", str(seed)] = (cs, judgements(cs, qids, docids, _random_qrels(rng, n_q, n_docs)))
    return out


def _node(payload: dict, queries: list[dict]) -> list[list[float]]:
    node = shutil.which("node")
    assert node, "node is needed to run the book's explorer script (it is also needed to vendor the book's JS)"
    code = ("const api = require(process.argv[1]);\nconst p = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
            "const sets = p.payload.sets.map(api.prepare);\n"
            "console.log(JSON.stringify(p.queries.map(q => sets.map(s => api.setMetric(s, q.weights, q.metric)))));")
    proc = subprocess.run([node, "-e", code, str(SCRIPT)], input=json.dumps({"payload": payload, "queries": queries}),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_browser_numbers_equal_bgem3_lib(data):
    payload = explorer_payload(data, ["a", "b"], METRICS, (1.0, 0.3, 1.0), [(1.0, 0.3, 1.0)] * 2)
    queries = [{"weights": list(w), "metric": m} for w in WEIGHTS for m in METRICS]
    got = _node(payload, queries)
    for q, values in zip(queries, got):
        ref = python_values(data, q["weights"], q["metric"])
        np.testing.assert_allclose(values, ref, atol=1e-12, err_msg=str(q))
    spread = {round(v, 6) for row in got for v in row}
    assert len(spread) > 5                       # the weights change the numbers: not a constant


def test_payload_holds_the_checks_and_the_reference(data):
    checks = [(0.5, 0.5, 0.0), (0.0, 1.0, 0.0)]
    payload = explorer_payload(data, ["a", "b"], ("ndcg@10",), (1.0, 0.3, 1.0), [(1.0, 0.3, 1.0)] * 2, checks)
    assert [c["weights"] for c in payload["checks"]] == [list(w) for w in checks]
    assert payload["checks"][1]["values"] == python_values(data, (0.0, 1.0, 0.0), "ndcg@10")
    assert payload["reference_values"]["ndcg@10"] == python_values(data, (1.0, 0.3, 1.0), "ndcg@10")
    cs, judged = data["set", "0"]
    enc = encode_set(cs, judged)
    assert sum(enc["counts"]) == int(cs.valid.sum()) and len(enc["rel_cols"]) == len(cs.ids)
    html = weight_explorer_html(payload, "x")
    assert html.count('type="range"') == 3 and "</script>" in html and html.count("</script>") == 1


def test_image_switcher_needs_every_combination():
    controls = {"pooling": ["cls", "mean"], "score": ["cos", "raw"]}
    images = {(p, s): b"\x89PNG" + p.encode() + s.encode() for p in controls["pooling"] for s in controls["score"]}
    html = image_switcher_html(images, controls, ("mean", "cos"), "sw")
    assert html.count("<img") == 4 and html.count(" hidden ") == 3
    del images["cls", "raw"]
    with pytest.raises(ValueError, match="no image"):
        image_switcher_html(images, controls, ("mean", "cos"), "sw")
