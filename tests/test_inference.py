"""inference.py end to end: folders, globs, URLs, corrupt files, outputs, exit status."""

import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoProcessor

from modeling_clipcap import ClipCapForCaptioning
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]


def run_inference(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "inference.py", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def expected_captions(model_dir, images, **kw):
    model = ClipCapForCaptioning.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    ids = model.generate(pixel_values=processor(images=images)["pixel_values"], **kw)
    return processor.batch_decode(ids)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    images = tiny.random_images(4, seed=3)
    images[0].save(folder / "a.png")
    images[1].save(folder / "b.jpg", quality=95)
    (folder / "nested").mkdir()
    images[2].convert("RGBA").save(folder / "nested" / "c.png")
    images[3].convert("L").save(folder / "d.bmp")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.png").write_text("plain text, not an image")
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    return folder


def test_folder_with_corrupt_files_captions_the_rest(image_folder, tiny_clipcap_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    run = run_inference(image_folder, "--model", tiny_clipcap_dir, "--num-beams", 2, "--max-new-tokens", 6,
                        "--batch-size", 2, "--output", out, "--quiet")
    assert run.returncode == 1  # something failed ...
    assert "broken.jpg" in run.stderr and "notes.png" in run.stderr and "2 input(s) failed, 4 captioned" in run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = [Path(r["image"]).name for r in rows]
    assert names == ["a.png", "b.jpg", "d.bmp", "c.png"]  # ... the rest is captioned, in a stable order
    images = [Image.open(r["image"]) for r in rows]
    assert [r["caption"] for r in rows] == expected_captions(tiny_clipcap_dir, images, num_beams=2, max_new_tokens=6)
    assert run.stdout.count("\t") == 4


def test_globs_missing_paths_and_csv(image_folder, tiny_clipcap_dir, tmp_path):
    out = tmp_path / "captions.csv"
    run = run_inference(f"{image_folder}/*.png", tmp_path / "missing.jpg", "--model", tiny_clipcap_dir,
                        "--max-new-tokens", 4, "--output", out, "--quiet")
    assert run.returncode == 1 and "missing.jpg: no such file" in run.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "image,caption" and len(lines) == 2  # a.png (notes.png is not an image)


def test_url_inputs_with_a_local_server(image_folder, tiny_clipcap_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        run = run_inference(f"{base}/a.png", f"{base}/nothing.png", "--model", tiny_clipcap_dir,
                            "--max-new-tokens", 4, "--timeout", 5, "--quiet")
    finally:
        server.shutdown()
    assert run.returncode == 1 and "nothing.png" in run.stderr and "404" in run.stderr
    caption = expected_captions(tiny_clipcap_dir, [Image.open(image_folder / "a.png")], max_new_tokens=4)[0]
    assert run.stdout.strip() == f"{base}/a.png\t{caption}"


def test_all_good_exits_zero_and_help(image_folder, tiny_clipcap_dir):
    run = run_inference(image_folder / "a.png", "--model", tiny_clipcap_dir, "--max-new-tokens", 3, "--quiet")
    assert run.returncode == 0, run.stderr
    help_run = run_inference("--help")
    assert help_run.returncode == 0 and "--num-beams" in help_run.stdout
    bad = run_inference(image_folder / "a.png", "--output", "x.txt")
    assert bad.returncode == 2 and "--output" in bad.stderr


def test_authors_release_folder_is_converted_on_the_fly(tmp_path, monkeypatch, capsys, tokenizer, image_folder):
    """A folder in the authors' release layout goes through `ensure_converted` and is captioned."""
    import inference
    import modeling_clipcap.convert_ndlb as convert_ndlb
    from tests.test_converters import HEAD_ARGS, AuthorsSender, write_release

    release = write_release(tmp_path / "release", AuthorsSender(len(tokenizer)).eval().checkpoint("only"))
    tokenizer.save_pretrained(release)
    monkeypatch.setenv("NDLB_CONVERTED_CACHE", str(tmp_path / "cache"))
    original = convert_ndlb.ensure_converted
    calls = []

    def with_tiny_heads(name, **kw):  # tiny widths hide the head count; real releases use 64-wide heads
        calls.append(name)
        return original(name, **HEAD_ARGS, **kw)

    monkeypatch.setattr(convert_ndlb, "ensure_converted", with_tiny_heads)
    image = image_folder / "a.png"
    assert inference.main([str(image), "--model", str(release), "--max-new-tokens", "5", "--quiet"]) == 0
    converted = with_tiny_heads(str(release))
    assert Path(converted).parent == tmp_path / "cache"
    caption = expected_captions(converted, [Image.open(image)], max_new_tokens=5)[0]
    assert capsys.readouterr().out.strip() == f"{image}\t{caption}"
