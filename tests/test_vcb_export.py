"""Export of the HolisticCap dataset folder: ``load_dataset`` reads it, values and
provenance match the run's records, and the App. A.2 length table matches an independent count."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import yaml

from datasets_scripts.vcb import (STAGES, EchoBackend, caption_length_stats, export_holisticcap, load_prompt,
                                  StageSettings, load_split, read_records, run_stage)
from tests.test_vcb_support import coco_captions, make_coco
from tests.tiny import build_tokenizer

SPLITS = {"train": [1, 2, 3, 4, 5, 6], "val": [7, 8], "test": [9]}
COLUMNS = {"cocoid", "split", "coco_captions", *STAGES,
           *(f"{s}_{k}" for s in STAGES for k in ("flags", "raw", "model", "prompt_sha256"))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished echo run over train and val (val's holisticcap for one id only); test untouched."""
    root = tmp_path_factory.mktemp("export")
    coco = make_coco(root, SPLITS)
    out = root / "run"
    llm, vlm = EchoBackend(model="echo-llm"), EchoBackend(model="echo-vlm")
    for split in ("train", "val"):
        data = load_split(coco, split)
        for stage in STAGES:
            run_stage(stage, data, out, vlm if stage == "visualcap" else llm, load_prompt(stage),
                      StageSettings(progress=False, limit=1 if (split, stage) == ("val", "holisticcap") else None))
    tok_dir = root / "tok"
    build_tokenizer().save_pretrained(tok_dir)
    return {"root": root, "coco": coco, "out": out, "tok_dir": str(tok_dir)}


def _load(folder, tmp_path):
    """``load_dataset`` on the exported folder, with a private cache: datasets 5.2 caches local
    folders with README ``configs:`` by folder name, so a shared cache could serve another
    test's folder of the same name."""
    import datasets

    return datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf_cache"))


def _independent_stats(texts, tok):
    words = np.array([len(t.split()) for t in texts], dtype=float)
    toks = np.array([len(tok(t)["input_ids"]) for t in texts], dtype=float)
    return words.mean(), words.std(), toks.mean(), toks.std()


def test_export_loads_with_load_dataset_and_matches_records(run, tmp_path):
    from transformers import AutoTokenizer

    dest = tmp_path / "holisticcap"
    summary = export_holisticcap(run["out"], run["coco"], dest, tokenizer=run["tok_dir"])
    assert summary["rows"] == {"train": 6, "val": 1} and summary["dropped_incomplete"] == {"train": 0, "val": 1}

    dd = _load(dest, tmp_path)
    assert set(dd) == {"train", "val"} and set(dd["train"].column_names) == COLUMNS
    assert dd["train"]["cocoid"] == SPLITS["train"] and dd["val"]["cocoid"] == [7]
    recs = {s: read_records(run["out"] / s) for s in STAGES}
    for row in dd["train"]:
        cid = row["cocoid"]
        assert row["split"] == "train" and row["coco_captions"] == coco_captions(cid)
        for s in STAGES:
            assert row[s] == recs[s][cid]["text"] and row[f"{s}_raw"] == recs[s][cid]["raw"]
            assert row[f"{s}_flags"] == recs[s][cid]["flags"]
            assert row[f"{s}_prompt_sha256"] == load_prompt(s).sha256
        assert row["visualcap_model"] == "echo-vlm" and row["blendcap_model"] == "echo-llm"

    # dataset card: YAML configs with one data file pattern per split, provenance, length table
    card = (dest / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train-*.parquet"}, {"split": "val", "path": "data/val-*.parquet"}]}]
    assert "echo-llm" in card and load_prompt("holisticcap").sha256[:12] in card and "Toks/Cap" in card
    runs = json.loads((dest / "runs.json").read_text())
    assert {r["generation"]["model"] for r in runs["visualcap"]} == {"echo-vlm"}

    # App. A.2 length table: same numbers as an independent count over the exported captions
    tok = AutoTokenizer.from_pretrained(run["tok_dir"])
    cols = {"COCO": [c for split in dd.values() for caps in split["coco_captions"] for c in caps],
            "BlendCap": [t for split in dd.values() for t in split["blendcap"]],
            "HolisticCap": [t for split in dd.values() for t in split["holisticcap"]],
            "Visual Caption": [t for split in dd.values() for t in split["visualcap"]]}
    stats = json.loads((dest / "token_stats.json").read_text())["stats"]
    for name, texts in cols.items():
        s = stats[name]
        assert s["n"] == len(texts)
        np.testing.assert_allclose([s["words_mean"], s["words_std"], s["tokens_mean"], s["tokens_std"]],
                                   _independent_stats(texts, tok), rtol=1e-9)
    table = (dest / "token_stats.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1 COCO", "2 BlendCap", "3 HolisticCap",
                                                                   "4 Visual Caption"]
    assert f"{stats['BlendCap']['words_mean']:.1f} ±{stats['BlendCap']['words_std']:.1f}" in table[3]


def test_length_stats_hand_computed(run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run["tok_dir"])
    s = caption_length_stats(["one two three", "a b c d e"], tok)
    assert (s["n"], s["words_mean"], s["words_std"]) == (2, 4.0, 1.0)
    assert s["tokens_mean"] == np.mean([len(tok("one two three").input_ids), len(tok("a b c d e").input_ids)])


def test_partial_export_overwrite_and_cli(run, tmp_path):
    from datasets_scripts.vcb.__main__ import main

    dest = tmp_path / "ds"
    export_holisticcap(run["out"], run["coco"], dest, tokenizer=run["tok_dir"], allow_partial=True, splits=["val"])
    val = _load(dest, tmp_path / "a")["val"]
    assert val["cocoid"] == [7, 8] and val["holisticcap"][1] is None and val["blendcap"][1] is not None
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_holisticcap(run["out"], run["coco"], dest, tokenizer=run["tok_dir"])
    old = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["export", "--run-dir", str(run["out"]), "--dataset", str(run["coco"]), "--out", str(dest),
                     "--tokenizer", run["tok_dir"], "--overwrite"]) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    assert set(_load(dest, tmp_path / "b")) == {"train", "val"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]     # no temporary folder left
