"""The `cider_d` evaluate module: loads offline from its folder in a fresh process, self-contained.

metrics/cider_d/{cider,bleu,ptb_tokenizer,ptb_lexer_tables,caption_metric}.py are symbolic links to
the single implementation in metrics/; `evaluate.load` must copy their contents into its module
cache. A `None` prediction is a missing caption, scored as an empty one and reported.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from metrics.cider import CiderD
from metrics.ptb_tokenizer import ptb_tokenize

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "metrics" / "cider_d"
LINKED = ["cider.py", "bleu.py", "ptb_tokenizer.py", "ptb_lexer_tables.py", "caption_metric.py"]

PREDICTIONS = ["A dog runs on the grass.", "A cat on a sofa.", "Two men, (one in red) playing frisbee!"]
REFERENCES = [["A dog running on the grass.", "A brown dog runs outside."],
              ["Two cats sleep on a red sofa.", "A cat lying on a couch.", "A kitten on the sofa."],
              ["Two men play frisbee in a park.", "A man in a red shirt throws a frisbee."]]

SCRIPT = """
import json, sys, evaluate
module = evaluate.load(sys.argv[1])
raw = module.compute(predictions=json.loads(sys.argv[2]), references=json.loads(sys.argv[3]), per_caption=True)
tok = module.compute(predictions=json.loads(sys.argv[4]), references=json.loads(sys.argv[5]), tokenize=False)
folder = sys.modules[type(module).__module__].__file__.rsplit("/", 1)[0]
import os
print(json.dumps({"raw": raw, "tok": tok, "folder": folder, "files": sorted(os.listdir(folder)),
                  "links": [f for f in os.listdir(folder) if os.path.islink(os.path.join(folder, f))],
                  "repo_imported": sorted(m for m in sys.modules if m == "metrics" or m.startswith("metrics."))}))
"""


def test_linked_files_point_to_the_single_implementation():
    for name in LINKED:
        path = MODULE / name
        assert path.is_symlink(), f"{path} must be a symlink to ../{name}"
        assert os.readlink(path) == f"../{name}" and path.resolve() == (ROOT / "metrics" / name).resolve()


def test_loads_offline_in_a_fresh_process_outside_the_repo(tmp_path):
    tok_refs = [ptb_tokenize(r) for r in REFERENCES]
    tok_preds = ptb_tokenize(PREDICTIONS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(MODULE), json.dumps(PREDICTIONS), json.dumps(REFERENCES),
         json.dumps(tok_preds), json.dumps(tok_refs)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # self-contained: real copies of the linked files in evaluate's cache, nothing from the repo
    assert out["repo_imported"] == [] and out["links"] == []
    assert set(LINKED + ["cider_d.py"]) <= set(out["files"])
    for name in LINKED:
        assert (Path(out["folder"]) / name).read_bytes() == (ROOT / "metrics" / name).read_bytes()
    # the values of pycocoevalcap on the same tokenised captions
    gts = dict(enumerate(tok_refs))
    res = {i: [p] for i, p in enumerate(tok_preds)}
    cider, per_caption = Cider().compute_score(gts, res)
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for got in (out["raw"], out["tok"]):
        assert got["cider"] == pytest.approx(cider, abs=1e-12)
        assert [got[f"bleu_{k}"] for k in range(1, 5)] == bleus
    assert np.abs(np.array(out["raw"]["cider_per_caption"]) - per_caption).max() <= 1e-12
    assert "cider_per_caption" not in out["tok"]
    # known values (pycocoevalcap with its Java tokenizer gives the same: see tests/test_ptb_tokenizer.py)
    assert out["raw"]["cider"] == pytest.approx(1.8962942275777193, abs=1e-12)


def test_document_frequency_corpus_option(monkeypatch):
    import evaluate

    monkeypatch.chdir(ROOT)
    module = evaluate.load("metrics/cider_d")
    corpus = REFERENCES + [["A red bus on a street."], ["A plate of food."], ["A dog and a cat."]]
    expected = CiderD(corpus).score(PREDICTIONS, REFERENCES)
    from_list = module.compute(predictions=PREDICTIONS, references=REFERENCES, document_frequency_corpus=corpus,
                               per_caption=True)
    from_scorer = module.compute(predictions=PREDICTIONS, references=REFERENCES,
                                 document_frequency_corpus=CiderD(corpus), per_caption=True)
    for got in (from_list, from_scorer):
        assert got["cider"] == pytest.approx(expected[0], abs=1e-12)
        assert np.abs(np.array(got["cider_per_caption"]) - expected[1]).max() <= 1e-12
    default = module.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert default["cider"] != pytest.approx(expected[0])  # the corpus changes the document frequencies
    assert from_list["bleu_4"] == default["bleu_4"]


def test_docstring_examples_run(monkeypatch):
    import evaluate

    monkeypatch.chdir(ROOT)  # the examples load "metrics/cider_d" from the repository root
    module = evaluate.load("metrics/cider_d")
    parser = doctest.DocTestParser()
    test = parser.get_doctest(module.inputs_description, {}, "cider_d", str(MODULE / "cider_d.py"), 0)
    assert len(test.examples) >= 3
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test)
    assert result.failed == 0


def test_missing_caption_scores_as_an_empty_caption(monkeypatch):
    import evaluate

    monkeypatch.chdir(ROOT)
    module = evaluate.load("metrics/cider_d")
    assert module.name == "cider_d"
    predictions = [None, *PREDICTIONS[1:]]
    got = module.compute(predictions=predictions, references=REFERENCES, per_caption=True)
    tok_refs = [ptb_tokenize(r) for r in REFERENCES]
    tok_preds = ptb_tokenize(["", *PREDICTIONS[1:]])
    assert tok_preds[0] == ""
    gts, res = dict(enumerate(tok_refs)), {i: [p] for i, p in enumerate(tok_preds)}
    cider, per_caption = Cider().compute_score(gts, res)
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert got["cider"] == pytest.approx(cider, abs=1e-12) and got["cider_per_caption"][0] == 0.0
    assert np.abs(np.array(got["cider_per_caption"]) - per_caption).max() <= 1e-12
    assert [got[f"bleu_{k}"] for k in range(1, 5)] == bleus
    assert got["missing"] == [0] and got["num_missing"] == 1
    module.add_batch(predictions=predictions[:1], references=REFERENCES[:1])  # None first in its batch
    module.add_batch(predictions=predictions[1:], references=REFERENCES[1:])
    assert module.compute(per_caption=True) == got
