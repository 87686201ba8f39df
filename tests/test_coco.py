"""COCO/Karpathy import (datasets_scripts/coco.py) on a small generated Karpathy json + images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from datasets_scripts.coco import MissingImagesError, build_coco, load_coco, main
from tests.tiny import random_images

MISSING_ID, CORRUPT_ID = 104, 105


def make_coco(root: Path, n: int = 8, missing: bool = True, corrupt: bool = True) -> tuple[Path, Path, list[dict]]:
    """Images under root/images/{train2014,val2014} + root/dataset_coco.json.

    cocoids 100..100+n-1; splits cycle test, val, train, restval; id 104 is missing, 105 corrupt.
    """
    images = root / "images"
    labels = ["test", "val", "train", "restval"]
    records = []
    for i, im in enumerate(random_images(n, size=24, seed=1)):
        cid = 100 + i
        split = labels[i % 4]
        sub = "val2014" if split in ("test", "val") else "train2014"
        name = f"COCO_{sub}_{cid:012d}.jpg"
        (images / sub).mkdir(parents=True, exist_ok=True)
        if cid == MISSING_ID and missing:
            pass
        elif cid == CORRUPT_ID and corrupt:
            (images / sub / name).write_bytes(b"this is not a jpeg")
        else:
            im.save(images / sub / name, format="PNG")  # PNG bytes: lossless, so pixels can be compared
        sents = [{"raw": f"caption {k} of image {cid}. ", "tokens": []} for k in range(5 + (i == 0))]
        records.append({"filepath": sub, "filename": name, "cocoid": cid, "split": split, "sentences": sents})
    kjson = root / "dataset_coco.json"
    kjson.write_text(json.dumps({"images": records, "dataset": "coco"}))
    return images, kjson, records


def test_missing_and_corrupt_fail_by_default(tmp_path):
    images, kjson, _ = make_coco(tmp_path)
    report = tmp_path / "report.json"
    with pytest.raises(MissingImagesError) as e:
        build_coco(images, kjson, progress=False, report_path=report)
    assert e.value.missing == [MISSING_ID] and list(e.value.corrupt) == [CORRUPT_ID]
    assert "2 of 8" in str(e.value) and str(MISSING_ID) in str(e.value) and "--allow-missing" in str(e.value)
    rep = json.loads(report.read_text())
    assert rep["missing"] == [MISSING_ID] and list(rep["corrupt"]) == [str(CORRUPT_ID)]


def test_allow_missing_keeps_rows_with_none(tmp_path):
    images, kjson, records = make_coco(tmp_path)
    dsd, rep = build_coco(images, kjson, allow_missing=True, progress=False)
    assert list(dsd) == ["train", "val", "test"]
    # restval rows (ids 103, 107) go to train after the train rows, file order kept within labels
    assert dsd["train"]["cocoid"] == [102, 103, 106, 107]
    assert dsd["train"]["split"] == ["train", "restval", "train", "restval"]
    assert dsd["test"]["cocoid"] == [100, 104] and dsd["val"]["cocoid"] == [101, 105]
    assert sum(len(d) for d in dsd.values()) == 8  # nothing dropped
    assert dsd["test"][1]["image"] is None and dsd["val"][1]["image"] is None
    assert dsd["test"][0]["captions"][0] == "caption 0 of image 100." and len(dsd["test"][0]["captions"]) == 6
    assert rep["n_missing"] == 1 and rep["n_corrupt"] == 1
    assert dsd["train"].features["cocoid"].dtype == "int64"
    # restval kept apart on request
    dsd2, _ = build_coco(images, kjson, allow_missing=True, restval="restval", progress=False)
    assert dsd2["restval"]["cocoid"] == [103, 107] and dsd2["train"]["cocoid"] == [102, 106]


def test_cli_parquet_path_backed_and_embedded(tmp_path):
    images, kjson, _ = make_coco(tmp_path, missing=False, corrupt=False)
    originals = {100 + i: np.asarray(im) for i, im in enumerate(random_images(8, size=24, seed=1))}
    out = tmp_path / "coco"
    assert main(["--images", str(images), "--karpathy", str(kjson), "--out", str(out)]) == 0
    assert (out / "README.md").exists() and (out / "import_report.json").exists()
    dsd = load_coco(out, cache_dir=str(tmp_path / "cache"))
    assert {s: len(d) for s, d in dsd.items()} == {"train": 4, "val": 2, "test": 2}
    row = dsd["val"][0]
    assert row["cocoid"] == 101 and np.array_equal(np.asarray(row["image"]), originals[101])
    raw = dsd["val"].cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] is None and os.path.isabs(raw["path"])  # path-backed
    # the README's YAML configs make the folder loadable with plain load_dataset
    assert len(datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache2"))["train"]) == 4

    # rerun with the same options resumes (no error); other options need --overwrite
    assert main(["--images", str(images), "--karpathy", str(kjson), "--out", str(out)]) == 0
    assert main(["--images", str(images), "--karpathy", str(kjson), "--out", str(out), "--embed-images"]) == 2
    assert main(["--images", str(images), "--karpathy", str(kjson), "--out", str(out), "--embed-images",
                 "--overwrite"]) == 0
    for f in images.rglob("*.jpg"):  # embedded: the folder no longer needs the COCO files
        f.unlink()
    dsd = load_coco(out, cache_dir=str(tmp_path / "cache3"))
    assert np.array_equal(np.asarray(dsd["test"][1]["image"]), originals[104])


def test_cli_arrow_and_missing_exit_code(tmp_path, capsys):
    images, kjson, _ = make_coco(tmp_path)
    out = tmp_path / "coco_arrow"
    assert main(["--images", str(images), "--karpathy", str(kjson), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "104" in err and "105" in err and "--allow-missing" in err
    assert main(["--images", str(images), "--karpathy", str(kjson), "--out", str(out), "--format", "arrow",
                 "--allow-missing"]) == 0
    dsd = load_coco(out)
    assert dsd["test"]["cocoid"] == [100, 104] and dsd["test"][1]["image"] is None
    assert dsd["test"][0]["image"].size == (24, 24)


def test_flat_2017_names_and_bad_json(tmp_path):
    images, kjson, records = make_coco(tmp_path, missing=False, corrupt=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    for r in records:  # 2017 naming: %012d.jpg in one folder
        os.replace(images / r["filepath"] / r["filename"], flat / f"{r['cocoid']:012d}.jpg")
    dsd, rep = build_coco(flat, kjson, progress=False)
    assert rep["n_missing"] == 0 and len(dsd["train"]) == 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"cocoid": 1, "filename": "x.jpg", "split": "test"}]}))
    with pytest.raises(ValueError, match="cocoid 1.*sentences"):
        build_coco(flat, bad, progress=False)


def test_help():
    r = subprocess.run([sys.executable, "-m", "datasets_scripts.coco", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--allow-missing" in r.stdout and "--embed-images" in r.stdout
