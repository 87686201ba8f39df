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
    """inference.py in a subprocess; in float32 (captions are compared with a float32 `generate`)."""
    args = [*map(str, args), *([] if "--dtype" in args or "--help" in args else ["--dtype", "float32"])]
    return subprocess.run([sys.executable, "inference.py", *args], cwd=cwd, capture_output=True,
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
    assert "note: skipped 1 file(s) in the given folders that are not in a supported image format (.txt 1)" in run.stderr
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
    assert inference.main([str(image), "--model", str(release), "--max-new-tokens", "5", "--quiet",
                           "--dtype", "float32"]) == 0
    converted = with_tiny_heads(str(release))
    assert Path(converted).parent == tmp_path / "cache"
    caption = expected_captions(converted, [Image.open(image)], max_new_tokens=5)[0]
    assert capsys.readouterr().out.strip() == f"{image}\t{caption}"


# -- issue 17: deadlines, streamed output, resume, argument checks, reported skips ------------------


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trickling_url_times_out_and_the_good_image_is_captioned(image_folder, tiny_clipcap_dir):
    """`inference.py URL img --timeout 3` against a server that sends one byte every 0.5 s: the URL
    fails at the 3 s deadline, the local image is captioned (issue 17.1)."""
    from tests.slow_server import DripServer

    good = image_folder / "a.png"
    with DripServer(interval=0.5, max_seconds=30) as server:
        url = f"{server.url}/photo.jpg"
        run = run_inference(url, good, "--model", tiny_clipcap_dir, "--max-new-tokens", 4, "--timeout", 3,
                            "--quiet")
    caption = expected_captions(tiny_clipcap_dir, [Image.open(good)], max_new_tokens=4)[0]
    assert run.returncode == 1, run.stderr
    assert run.stdout.strip() == f"{good}\t{caption}"
    assert f"error: {url}: TimeoutError: {url}: not downloaded within 3 s" in run.stderr
    assert "1 input(s) failed, 1 captioned" in run.stderr


def test_unwritable_or_existing_output_fails_before_any_work(image_folder, tmp_path, capsys):
    """The output is checked first: one error line, and no model loaded (this model id would fail)."""
    import inference

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "folder.jsonl").mkdir()
    existing = tmp_path / "done.jsonl"
    existing.write_text('{"image": "x.png", "caption": "a cat."}\n')
    for output, message in [(blocker / "captions.jsonl", "cannot be written (FileExistsError"),
                            (tmp_path / "folder.jsonl", "is a folder"),
                            (existing, "already exists; pass --resume")]:
        status = inference.main([str(image_folder / "a.png"), "--model", "nobody/no-such-model", "--output",
                                 str(output), "--quiet"])
        err = capsys.readouterr().err
        assert status == 2 and err.startswith(f"error: --output {output}") and len(err.splitlines()) == 1, err
        assert message in err, err
    assert existing.read_text() == '{"image": "x.png", "caption": "a cat."}\n'  # untouched


def test_sigterm_keeps_the_finished_rows_and_resume_completes(tmp_path, tiny_clipcap_dir):
    """SIGTERM while the third batch waits for a slow URL: the four captions of the first two batches
    are in --output (written as they came), the exit is prompt (130) with the error summary, and
    `--resume` captions only the rest (issue 17.5)."""
    import signal
    import time

    from tests.slow_server import DripServer

    first, second = tmp_path / "first", tmp_path / "second"
    for k, folder in enumerate((first, second)):
        folder.mkdir()
        for i, image in enumerate(tiny.random_images(4, seed=10 + k)):
            image.save(folder / f"{i}.png")
    out = tmp_path / "captions.jsonl"
    common = ["--model", tiny_clipcap_dir, "--max-new-tokens", "4", "--batch-size", "2", "--quiet", "--output", out,
              "--dtype", "float32"]
    with DripServer(interval=0.5, max_seconds=120) as server:
        url = f"{server.url}/slow.jpg"
        proc = subprocess.Popen([sys.executable, "inference.py", first, url, second, "--timeout", "100",
                                 *map(str, common)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None and not (
                    out.is_file() and len(out.read_text().splitlines()) >= 4 and server.requests):
                time.sleep(0.05)
            time.sleep(0.3)
            assert proc.poll() is None, proc.communicate()[1]
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert time.monotonic() - sent < 10  # no wait for the download in flight
    assert proc.returncode == 130, stderr
    assert "interrupted; the 4 caption(s) of this run are in" in stderr and "--resume" in stderr
    rows = read_rows(out)
    firsts = sorted(str(p) for p in first.iterdir())
    assert [r["image"] for r in rows] == firsts and stdout.count("\t") == 4
    expected = dict(zip(firsts + sorted(str(p) for p in second.iterdir()),
                        expected_captions(tiny_clipcap_dir, [Image.open(p) for p in firsts]
                                          + [Image.open(p) for p in sorted(second.iterdir())], max_new_tokens=4)))
    assert all(r["caption"] == expected[r["image"]] for r in rows)

    with out.open("a") as f:  # as if killed in mid-write
        f.write('{"image": "' + str(second / "0.png"))
    run = run_inference(first, second, "--resume", *common)
    assert run.returncode == 0, run.stderr
    assert "4 image(s) already captioned there, 4 to go (an incomplete last row was removed)" in run.stderr
    rows = read_rows(out)
    assert [r["image"] for r in rows] == list(expected) and {r["image"]: r["caption"] for r in rows} == expected
    import inference  # nothing left to do: no model is even loaded

    assert inference.main([str(first), str(second), "--resume", *map(str, common)]) == 0
    assert read_rows(out) == rows


def test_csv_output_resumes(tmp_path):
    import inference

    path = tmp_path / "c.csv"
    writer = inference.CaptionWriter(path)
    writer.write("a, b.png", 'a "quoted" caption')
    writer.close()
    resumed = inference.CaptionWriter(path, resume=True)
    assert resumed.done == {"a, b.png"}
    resumed.write("c.png", "more")
    resumed.close()
    assert path.read_text().splitlines() == ["image,caption", '"a, b.png","a ""quoted"" caption"', "c.png,more"]
    (tmp_path / "other.csv").write_text("id,text\n1,x\n")
    with pytest.raises(inference.OutputError, match="not image,caption"):
        inference.CaptionWriter(tmp_path / "other.csv", resume=True)


@pytest.mark.parametrize("argv, message", [
    (["--num-beams", "0"], "argument --num-beams: 0 is not allowed; give a beam size of 1 or more"),
    (["--num-beams", "-3"], "argument --num-beams: -3 is not allowed; give a beam size of 1 or more"),
    (["--num-beams", "two"], "argument --num-beams: 'two' is not a number"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not allowed; give a caption length of 1 token"),
    (["--batch-size", "0"], "argument --batch-size: 0 is not allowed"),
    (["--timeout", "0"], "argument --timeout: 0 is not allowed; give a number of seconds above 0"),
    (["--model", "./no/such/model"], "--model ./no/such/model: no such model folder, and not a Hub repo id"),
    (["--model", "/no/such/folder"], "--model /no/such/folder: no such model folder"),
    (["--resume"], "--resume continues an --output file: give --output too"),
])
def test_bad_arguments_give_one_error_line(argv, message, capsys):
    import inference

    with pytest.raises(SystemExit) as exit_info:
        inference.parse_args(["photo.jpg", *argv])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors


def test_a_model_that_cannot_be_loaded_is_one_error_line(image_folder, capsys):
    import inference

    assert inference.main([str(image_folder / "a.png"), "--model", "nobody/no-such-model", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: --model nobody/no-such-model: cannot load it (")


def test_folder_expansion_reports_broken_links_and_unsupported_files(tmp_path, capsys):
    import inference

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    tiny.random_images(1)[0].save(folder / "sub" / "real.png")
    (folder / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (folder / "notes.txt").write_text("text")
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # dangling
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")  # a -> b -> a
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    (folder / "sub" / "up").symlink_to(folder)  # a folder link back to an ancestor
    (folder / "alias.png").symlink_to(folder / "sub" / "real.png")  # a good link is followed
    (tmp_path / "elsewhere").mkdir()
    tiny.random_images(1)[0].save(tmp_path / "elsewhere" / "x.png")
    (folder / "linked_dir").symlink_to(tmp_path / "elsewhere")

    sources, failures, skipped = inference.expand_sources([str(folder), str(tmp_path / "gone-too.jpg")])
    assert sources == [str(folder / "alias.png"), str(folder / "linked_dir" / "x.png"), str(folder / "sub" / "real.png")]
    reasons = {Path(f.source).name: f.reason for f in failures}
    assert reasons["gone.jpg"].startswith("dangling symbolic link: its target")
    assert "symbolic link loop" in reasons["loop_a.png"] and "symbolic link loop" in reasons["loop_b.png"]
    assert "symbolic link loop" in reasons["up"] and reasons["gone-too.jpg"] == "no such file, folder or URL"
    assert sorted(kind for _, kind in skipped) == [".svg", ".txt"]
    inference.report_skipped(skipped)
    note = capsys.readouterr().err
    assert note.startswith("note: skipped 2 file(s)") and "logo.svg" in note and ".svg 1" in note
