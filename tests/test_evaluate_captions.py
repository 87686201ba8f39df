"""evaluate_captions.py end to end on a small generated benchmark (TrueMatch in our dataset format
and in the authors' format, RD, CLIPScore, CIDEr-D / BLEU) with a missing caption."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

import evaluate_captions as ec
import evaluation
from metrics.clip_judge import ClipJudge
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
IDS = list(range(101, 110))
BAGS = {3: [[101, 102, 103], [104, 105, 106], [107, 108, 109]], 5: [[101, 103, 105, 107, 109]]}
WORDS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink"]
MISSING = 105


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Images (COCO 2014 names), authors'-format bags, our parquet TrueMatch folder, references and
    a captions file without a caption for image 105."""
    root = tmp_path_factory.mktemp("bench")
    images = root / "images"
    images.mkdir()
    for cid, im in zip(IDS, tiny.random_images(len(IDS), size=40, seed=11)):
        im.save(images / f"COCO_val2014_{cid:012d}.jpg")
    refs = {str(cid): [f"a {w} circle.", f"one {w} shape on the left."] for cid, w in zip(IDS, WORDS)}

    authors = root / "authors"
    authors.mkdir()
    for s, bags in BAGS.items():
        (authors / f"{s}.json").write_text(json.dumps(bags))

    ours = root / "truematch"
    features = datasets.Features({"bag_id": datasets.Value("int64"), "cocoids": datasets.List(datasets.Value("int64")),
                                  "images": datasets.List(datasets.Image()),
                                  "captions": datasets.List(datasets.List(datasets.Value("string"))),
                                  "alpha": datasets.Value("float64")})
    for s, bags in BAGS.items():
        rows = {"bag_id": list(range(len(bags))), "cocoids": bags, "alpha": [0.9] * len(bags),
                "images": [[{"bytes": (images / f"COCO_val2014_{c:012d}.jpg").read_bytes(), "path": f"{c}.jpg"}
                            for c in bag] for bag in bags],
                "captions": [[refs[str(c)] for c in bag] for bag in bags]}
        out = ours / f"bags_{s}" / "test-00000-of-00001.parquet"
        out.parent.mkdir(parents=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(out))
    configs = "".join(f"- config_name: bags_{s}\n  data_files:\n  - split: test\n    path: bags_{s}/test-*.parquet\n"
                      for s in BAGS)
    (ours / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# TrueMatch (test)\n")

    (root / "refs.json").write_text(json.dumps(refs))
    captions = {str(cid): f"a {w} circle on the left." for cid, w in zip(IDS, WORDS) if cid != MISSING}
    captions["999"] = "an image in no benchmark."
    (root / "captions.json").write_text(json.dumps(captions))
    return root


def run(bench, tiny_clip_judge_dir, *extra):
    argv = ["--captions", str(bench / "captions.json"), "--judge", str(tiny_clip_judge_dir), "--device", "cpu",
            "--bag-sizes", "3", "5", *extra]
    return ec.main(argv)


def expected_truematch(judge, bench, captions):
    """Independent R@1 per bag size: numpy, strictly highest in the bag, missing = wrong."""
    paths = {c: str(bench / "images" / f"COCO_val2014_{c:012d}.jpg") for c in IDS}
    img = dict(zip(IDS, judge.embed_images([paths[c] for c in IDS]).numpy().astype(np.float64)))
    have = [c for c in IDS if str(c) in captions]
    txt = dict(zip(have, judge.embed_texts([captions[str(c)] for c in have]).numpy().astype(np.float64)))
    out = {}
    for s, bags in BAGS.items():
        ok = []
        for bag in bags:
            for c in bag:
                ok.append(c in txt and all(txt[c] @ img[c] > txt[c] @ img[o] for o in bag if o != c))
        out[s] = 100 * float(np.mean(ok))
    return out


def test_end_to_end_with_missing_caption(bench, tiny_clip_judge_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = run(bench, tiny_clip_judge_dir, "--truematch", str(bench / "authors"), "--truematch-images",
             str(bench / "images"), "--references", str(bench / "refs.json"), "--images", str(bench / "images"),
             "--num-distractors", "3", "--output", str(out))
    assert rc == 0
    printed = capsys.readouterr()
    for col in ("TM #3", "TM #5", "RD4", "ClipSc", "CLIP-S", "RefCLIP-S", "CIDEr", "BLEU-4", "vocab", "words>=5",
                "mean len"):
        assert col in printed.out
    assert "105" in printed.err and "count as wrong" in printed.err
    res = json.loads(out.read_text())
    assert res["benchmarks"] == ["clipscore", "nlg", "rd100", "truematch"]
    # the missing caption is reported by id in every benchmark that needs it, never dropped
    for b in ("truematch", "rd4", "clipscore", "nlg"):
        assert res["missing"][b] == [str(MISSING)], b
    assert res["truematch"]["num_captions"] == 14  # 3 bags of 3 + 1 bag of 5, missing included
    judge = ClipJudge.from_pretrained(str(tiny_clip_judge_dir), device="cpu")
    captions = evaluation.read_captions(bench / "captions.json")
    exp = expected_truematch(judge, bench, captions)
    assert res["table"]["TM #3"] == pytest.approx(exp[3]) and res["table"]["TM #5"] == pytest.approx(exp[5])
    assert res["rd4"]["num_candidates"] == 4 and res["rd4"]["num_captions"] == 9
    # CIDEr-D / BLEU-4 as pycocoevalcap computes them on the same PTB-tokenised captions
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from metrics.ptb_tokenizer import ptb_tokenize

    refs = json.loads((bench / "refs.json").read_text())
    gts = {c: ptb_tokenize(refs[str(c)]) for c in IDS}
    res_ = {c: ptb_tokenize([captions.get(str(c), "")]) for c in IDS}
    cider, _ = Cider().compute_score(gts, res_)
    bleu, _ = Bleu(4).compute_score(gts, res_, verbose=0)
    assert res["nlg"]["cider"] == pytest.approx(cider, abs=1e-9)
    assert res["nlg"]["bleu_4"] == pytest.approx(bleu[3], abs=1e-9)
    assert res["table"]["CIDEr"] == pytest.approx(100 * cider, abs=1e-7)
    # vocabulary over the 8 captions of the evaluated set: a, circle, on, the, left + 8 colours
    assert res["vocabulary"]["vocab_size"] == 13 and res["vocabulary"]["words_ge5"] == 5
    assert res["vocabulary"]["mean_length"] == pytest.approx(6.0)
    # the caption of image 999 (in no benchmark) is counted and named, not silently ignored
    assert res["captions_outside_benchmarks"] == {"count": 1, "ids": ["999"]}
    assert "note: 1 of 9 captions are for ids in none of the evaluated benchmarks and are not scored: 999" in printed.err


def test_our_dataset_format_matches_authors_format(bench, tiny_clip_judge_dir, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run(bench, tiny_clip_judge_dir, "--benchmark", "truematch", "--truematch", str(bench / "authors"),
               "--truematch-images", str(bench / "images"), "--output", str(a)) == 0
    assert run(bench, tiny_clip_judge_dir, "--benchmark", "truematch", "--truematch", str(bench / "truematch"),
               "--output", str(b)) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for k in ("recall_at_1", "recall_at_1_bag_3", "recall_at_1_bag_5", "missing", "num_captions"):
        assert ra["truematch"][k] == rb["truematch"][k], k
    assert rb["truematch"]["clipsc"] == pytest.approx(ra["truematch"]["clipsc"], abs=1e-3)


def test_images_and_references_from_truematch_rows(bench, tiny_clip_judge_dir, tmp_path):
    """With only --truematch (our format), RD and NLG use the bagged images and their COCO captions."""
    out = tmp_path / "r.json"
    assert run(bench, tiny_clip_judge_dir, "--truematch", str(bench / "truematch"), "--num-distractors", "2",
               "--output", str(out)) == 0
    res = json.loads(out.read_text())
    assert set(res["benchmarks"]) == {"truematch", "rd100", "clipscore", "nlg"}
    assert res["rd3"]["eval_set"].startswith("TrueMatch images") and res["rd3"]["num_captions"] == 9
    assert res["nlg"]["num_missing"] == 1


def test_strict_and_errors(bench, tiny_clip_judge_dir, tmp_path, capsys):
    assert run(bench, tiny_clip_judge_dir, "--truematch", str(bench / "authors"), "--truematch-images",
               str(bench / "images"), "--strict") == 1
    with pytest.raises(SystemExit, match="--imagecode-data"):
        run(bench, tiny_clip_judge_dir, "--benchmark", "imagecode")
    with pytest.raises(SystemExit, match="--truematch"):
        run(bench, tiny_clip_judge_dir, "--benchmark", "truematch")
    # authors' format without an images folder: a clear error naming the flag
    assert run(bench, tiny_clip_judge_dir, "--truematch", str(bench / "authors")) == 2
    assert "--truematch-images" in capsys.readouterr().err
    # an image that is not in the folder is named
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(bench, tiny_clip_judge_dir, "--truematch", str(bench / "authors"), "--truematch-images",
               str(empty)) == 2
    assert "no image for id 101" in capsys.readouterr().err


def test_read_captions_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"image_id": "000000000007", "caption": " a cat "}\n{"cocoid": 8, "caption": "b"}\n')
    assert evaluation.read_captions(tmp_path / "a.jsonl") == {"7": "a cat", "8": "b"}
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["cocoid", "caption"], [7, "a, quoted caption"], [8, ""]])
    assert evaluation.read_captions(tmp_path / "a.csv") == {"7": "a, quoted caption", "8": ""}
    (tmp_path / "b.json").write_text(json.dumps([{"cocoid": 7, "caption": "x"}, {"image_id": 9, "caption": "y"}]))
    assert evaluation.read_captions(tmp_path / "b.json") == {"7": "x", "9": "y"}
    (tmp_path / "c.json").write_text(json.dumps([{"cocoid": 7, "caption": "x"}, {"cocoid": "7", "caption": "y"}]))
    with pytest.raises(ValueError, match="more than one caption"):
        evaluation.read_captions(tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"7": 3}))
    with pytest.raises(ValueError, match="id '7'"):
        evaluation.read_captions(tmp_path / "d.json")


def test_help():
    res = subprocess.run([sys.executable, str(ROOT / "evaluate_captions.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0
    for word in ("--captions", "--benchmark", "truematch", "rd100", "imagecode", "--references", "--judge",
                 "--output", "--strict"):
        assert word in res.stdout


def test_imagecode_benchmark(tiny_clip_judge_dir, tmp_path):
    sets = tmp_path / "image-sets"
    for name in ("video-a_1", "open-images-2_b"):
        (sets / name).mkdir(parents=True)
        for i, im in enumerate(tiny.random_images(3, seed=len(name))):
            im.save(sets / name / f"img{i}.jpg")
    (tmp_path / "valid_data.json").write_text(json.dumps({"video-a_1": {"0": "x", "2": "y"},
                                                          "open-images-2_b": {"1": "z"}}))
    (tmp_path / "caps.json").write_text(json.dumps({"video-a_1/img0": "a red circle.",
                                                    "open-images-2_b/img1": "a blue star."}))
    out = tmp_path / "r.json"
    assert ec.main(["--captions", str(tmp_path / "caps.json"), "--imagecode-data", str(tmp_path / "valid_data.json"),
                    "--imagecode-images", str(sets), "--judge", str(tiny_clip_judge_dir), "--device", "cpu",
                    "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmarks"] == ["imagecode"]
    assert res["imagecode"]["missing"] == ["video-a_1/img2"] and res["imagecode"]["num_captions"] == 3
    assert res["imagecode"]["recall_at_1"] <= 2 / 3 and "recall_at_1_static" in res["imagecode"]


def test_references_from_coco_dataset_folder(bench, tiny_clip_judge_dir, tmp_path):
    """A COCO dataset folder (docs/formats.md, save_to_disk) gives the same RD / CLIP-S / CIDEr as the same
    references as json + an images folder."""
    refs = json.loads((bench / "refs.json").read_text())
    ds = datasets.Dataset.from_dict({
        "cocoid": IDS, "image": [str(bench / "images" / f"COCO_val2014_{c:012d}.jpg") for c in IDS],
        "captions": [refs[str(c)] for c in IDS], "split": ["test"] * len(IDS)}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "coco"))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--benchmark", "rd100", "clipscore", "nlg", "--num-distractors", "3"]
    assert run(bench, tiny_clip_judge_dir, *common, "--references", str(tmp_path / "coco"), "--output", str(a)) == 0
    assert run(bench, tiny_clip_judge_dir, *common, "--references", str(bench / "refs.json"), "--images",
               str(bench / "images"), "--output", str(b)) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["rd4"]["recall_at_1"] == rb["rd4"]["recall_at_1"] and ra["rd4"]["missing"] == ["105"]
    assert ra["nlg"]["cider"] == pytest.approx(rb["nlg"]["cider"], abs=1e-12)
    assert ra["clipscore"]["clip_score"] == pytest.approx(rb["clipscore"]["clip_score"], abs=1e-5)
    assert ra["rd4"]["eval_set"].endswith("[test] (9 images)")


# -- edge cases: captions file formats, no NaN in results, a bad bag, a judge that does not load ---


def test_duplicate_keys_bom_csv_and_inference_format(tmp_path):
    (tmp_path / "dup.json").write_text('{"7": "a cat.", "8": "a dog.", "7": "another cat."}')
    with pytest.raises(ValueError, match=r"dup.json: key '7' appears more than once"):
        evaluation.read_captions(tmp_path / "dup.json")
    (tmp_path / "dup.jsonl").write_text('{"cocoid": 7, "caption": "x"}\n{"cocoid": 8, "caption": "y", "caption": "z"}\n')
    with pytest.raises(ValueError, match=r"dup.jsonl:2: key 'caption' appears more than once"):
        evaluation.read_captions(tmp_path / "dup.jsonl")
    # a spreadsheet's CSV starts with a byte-order mark
    (tmp_path / "bom.csv").write_text("image_id,caption\n7,a cat.\n", encoding="utf-8-sig")
    assert evaluation.read_captions(tmp_path / "bom.csv") == {"7": "a cat."}
    # inference.py's own rows: matched by id or file name
    (tmp_path / "inf.csv").write_text("image,caption\nphotos/COCO_val2014_000000000007.jpg,a cat.\n"
                                      "https://example.com/x/000000000008.png,a dog.\nsets/s1/img3.jpg,a star.\n")
    raw = evaluation.read_captions(tmp_path / "inf.csv")
    assert evaluation.match_captions(raw, {"7", "8", "s1/img3"}) == {"7": "a cat.", "8": "a dog.", "s1/img3": "a star."}
    assert evaluation.match_captions(raw) == {"7": "a cat.", "8": "a dog.", "img3": "a star."}
    (tmp_path / "two.jsonl").write_text('{"image": "a/7.jpg", "caption": "x"}\n{"image": "b/7.png", "caption": "y"}\n')
    with pytest.raises(ValueError, match=r"two captions for id 7: under 'a/7.jpg' and 'b/7.png'"):
        evaluation.match_captions(evaluation.read_captions(tmp_path / "two.jsonl"), {"7"})


def test_inference_output_scores_like_an_id_keyed_file(bench, tiny_clip_judge_dir, tmp_path, capsys):
    """inference.py's jsonl (image paths, COCO 2014 names) gives the same results as the id-keyed file."""
    by_id = json.loads((bench / "captions.json").read_text())
    rows = [{"image": str(bench / "images" / f"COCO_val2014_{int(k):012d}.jpg"), "caption": c}
            for k, c in by_id.items() if k != "999"]
    rows.append({"image": "https://example.com/cat.png", "caption": "a cat."})
    (tmp_path / "inference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--judge", str(tiny_clip_judge_dir), "--device", "cpu", "--bag-sizes", "3", "5", "--truematch",
              str(bench / "authors"), "--truematch-images", str(bench / "images"), "--references",
              str(bench / "refs.json"), "--num-distractors", "3"]
    assert ec.main(["--captions", str(bench / "captions.json"), *common, "--output", str(a)]) == 0
    assert ec.main(["--captions", str(tmp_path / "inference.jsonl"), *common, "--output", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["table"] == rb["table"] and ra["missing"] == rb["missing"] == {b_: [str(MISSING)] for b_ in ra["missing"]}
    assert rb["captions_outside_benchmarks"] == {"count": 1, "ids": ["cat"]}


def test_results_json_never_holds_nan(bench, tiny_clip_judge_dir, tmp_path):
    """No caption in the evaluated set: the mean length is undefined and written as null."""
    (tmp_path / "caps.json").write_text(json.dumps({"999": "an image in no benchmark."}))
    out = tmp_path / "r.json"
    assert ec.main(["--captions", str(tmp_path / "caps.json"), "--judge", str(tiny_clip_judge_dir), "--device", "cpu",
                    "--benchmark", "truematch", "--truematch", str(bench / "authors"), "--bag-sizes", "3",
                    "--truematch-images", str(bench / "images"), "--output", str(out)]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in the results file")

    res = json.loads(out.read_text(), parse_constant=refuse)  # strict JSON
    assert res["vocabulary"]["mean_length"] is None and res["table"]["mean len"] is None
    assert res["table"]["TM #3"] == 0.0 and res["captions_outside_benchmarks"]["ids"] == ["999"]


def test_a_bag_with_an_image_twice_is_an_error(bench, tiny_clip_judge_dir, tmp_path, capsys):
    authors = tmp_path / "authors"
    authors.mkdir()
    (authors / "3.json").write_text(json.dumps([[101, 102, 103], [104, 105, 104]]))
    assert ec.main(["--captions", str(bench / "captions.json"), "--judge", str(tiny_clip_judge_dir), "--device",
                    "cpu", "--benchmark", "truematch", "--truematch", str(authors), "--bag-sizes", "3",
                    "--truematch-images", str(bench / "images")]) == 2
    err = capsys.readouterr().err
    assert f"error: {authors / '3.json'}: bag 1 holds image id(s) 104 more than once ([104, 105, 104])" in err


def test_a_judge_that_cannot_be_loaded_is_one_error_line(bench, tmp_path, capsys):
    common = ["--captions", str(bench / "captions.json"), "--benchmark", "truematch", "--truematch",
              str(bench / "authors"), "--bag-sizes", "3", "--truematch-images", str(bench / "images")]
    with pytest.raises(SystemExit) as exit_info:  # a path that does not exist: refused by the parser
        ec.main([*common, "--judge", str(tmp_path / "no-judge")])
    assert exit_info.value.code == 2
    assert f"error: --judge {tmp_path / 'no-judge'}: no such folder" in capsys.readouterr().err
    (tmp_path / "empty-judge").mkdir()  # a folder without a model: the loader's error, in one line
    assert ec.main([*common, "--judge", str(tmp_path / "empty-judge")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: ") and not any("Traceback" in line for line in err)
