"""Caption your own images with a ClipCap model.

    python inference.py photo.jpg holiday/ "scans/*.png" https://example.com/cat.jpg \
        [--model ID_OR_PATH] [--num-beams 5] [--batch-size 16] [--device auto|cpu|cuda] [--dtype auto] \
        [--output captions.jsonl|captions.csv [--resume]]

Inputs may be files, folders (searched recursively for images, symbolic links followed), glob
patterns and http(s) URLs. A model folder or Hub repo in the authors' release layout
(``manu-gaur/NDLB``) is detected and converted on the fly.

Failure behaviour: an input that cannot be read (missing, corrupt, not an image, a broken or
looping symbolic link, a URL that fails or is not downloaded within ``--timeout`` seconds overall
or is larger than ``--max-image-mb``) is reported by name and skipped; the others are still
captioned and the exit status is 1. Files of an unsupported type inside folders are counted and
named. ``--output`` is checked before any work and written row by row as batches finish; after an
interruption (Ctrl-C, SIGTERM: exit status 130) or a crash, ``--resume`` skips the images already
in it. The list of failed inputs is printed however the run ends.
"""

from __future__ import annotations

import argparse
import csv
import errno
import glob
import json
import os
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DEFAULT_MODEL = "manu-gaur/NDLB"
_SHOWN = 5  # names listed per skipped kind


@dataclass
class Failure:
    source: str
    reason: str


class OutputError(ValueError):
    """`--output` cannot be written (or resumed); the message says why and what to do."""


# -- inputs ------------------------------------------------------------------------------------------


def _broken_link(path: Path) -> str | None:
    """Why a symbolic link cannot be followed (dangling or looping), or None when it can."""
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        return f"dangling symbolic link: its target {os.readlink(path)!r} does not exist"
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return "symbolic link loop: the link leads back to itself"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop: the link leads back to itself"
        return f"unreadable symbolic link ({error.strerror or error})"
    return None


def _search_folder(folder: Path, found: list[str], failures: list[Failure], skipped: list[tuple[str, str]]) -> None:
    """Image files under `folder` (symbolic links followed, each real folder searched once)."""
    searched = {os.path.realpath(folder)}
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as error:
            failures.append(Failure(str(current), f"cannot list the folder ({error.strerror or error})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                problem = _broken_link(path)
                if problem is not None:
                    failures.append(Failure(str(path), problem))
                    continue
            if entry.is_dir():
                real = os.path.realpath(path)
                if real in searched or os.path.realpath(current).startswith(real + os.sep):
                    failures.append(Failure(str(path), f"symbolic link loop: it leads to {real}, which is "
                                                       "already searched (a folder that contains the link)"))
                    continue
                searched.add(real)
                stack.append(path)
            elif entry.is_file():
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(str(path))
                else:
                    skipped.append((str(path), path.suffix.lower() or "(no suffix)"))
            else:
                skipped.append((str(path), "(not a regular file)"))


def expand_sources(sources: list[str]) -> tuple[list[str], list[Failure], list[tuple[str, str]]]:
    """Files, folders (recursive), globs and URLs → (ordered, de-duplicated image sources,
    failures, skipped files as (path, suffix)): folders yield their files with an image suffix
    (sorted), and list the others as skipped; broken and looping links are failures."""
    found: list[str] = []
    failures: list[Failure] = []
    skipped: list[tuple[str, str]] = []
    for source in sources:
        if source.startswith(("http://", "https://")):
            found.append(source)
            continue
        path = Path(source)
        if path.is_symlink() and _broken_link(path) is not None:
            failures.append(Failure(source, _broken_link(path)))
        elif path.is_dir():
            in_folder: list[str] = []
            _search_folder(path, in_folder, failures, skipped)
            found += sorted(in_folder)
        elif path.is_file():
            found.append(str(path))
        elif glob.has_magic(source):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                failures.append(Failure(source, "the pattern matches no file"))
            for match in matches:  # each match as if given by name (a folder is searched)
                more_found, more_failures, more_skipped = expand_sources([match])
                found, failures, skipped = found + more_found, failures + more_failures, skipped + more_skipped
        else:
            failures.append(Failure(source, "no such file, folder or URL"))
    return list(dict.fromkeys(found)), failures, skipped


def report_skipped(skipped: list[tuple[str, str]]) -> None:
    """One note naming the files of an unsupported type found in folders, with counts per suffix."""
    if not skipped:
        return
    counts = Counter(kind for _, kind in skipped)
    kinds = ", ".join(f"{kind} {n}" for kind, n in counts.most_common())
    names = ", ".join(p for p, _ in skipped[:_SHOWN]) + (" ..." if len(skipped) > _SHOWN else "")
    print(f"note: skipped {len(skipped)} file(s) in the given folders that are not in a supported image format "
          f"({kinds}): {names}. Supported: {' '.join(sorted(IMAGE_SUFFIXES))}; convert the others (e.g. .svg) "
          "or pass them by name.", file=sys.stderr)


def try_load(source: str, timeout: float, max_bytes: int) -> Image.Image | Failure:
    """The decoded RGB image (a local file or an http(s) URL), or a Failure naming what went wrong."""
    from modeling_clipcap.image_loading import open_image

    try:
        return open_image(source, timeout=timeout, max_bytes=max_bytes)
    except Exception as error:  # undecodable data, OSError, the URL's deadline, httpx network and HTTP errors
        return Failure(source, f"{type(error).__name__}: {error}")


# -- model -------------------------------------------------------------------------------------------


def load_captioner(name_or_path: str, device: torch.device, dtype: str | torch.dtype | None = None):
    """(model, processor) from our format, or from the authors' release layout (converted).

    ``dtype``: ``"auto"`` = bf16 where `device` runs it natively (a CUDA GPU with bf16, a CPU with
    AMX / AVX-512 bf16), else float32; None or ``"float32"`` = float32; or a dtype name."""
    from metrics.clip_judge import resolve_dtype

    import modeling_clipcap  # noqa: F401  (registers the Auto classes)
    from modeling_clipcap import ClipCapForCaptioning
    from modeling_clipcap.convert_ndlb import ensure_converted

    folder = ensure_converted(name_or_path)
    from transformers import AutoProcessor

    model = ClipCapForCaptioning.from_pretrained(folder).to(device, dtype=resolve_dtype(dtype, device)).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


def compiled_generation_kwargs() -> dict:
    """`generate` arguments for a static KV cache with the forward compiled by `torch.compile`, on
    any device (transformers compiles only on accelerators by default). Measured on 2 CPU cores
    (benchmarks/bench_generate.py, batch 16): ~1.1x faster per call after a 12-15 s compile."""
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def load_all(sources: list[str], timeout: float, max_bytes: int, workers: int = 8) -> list[Image.Image | Failure]:
    """`try_load` of each source, `workers` at a time, in daemon threads: an interrupted run exits at
    once instead of waiting for downloads in flight (each ends at its deadline anyway)."""
    results: list[Image.Image | Failure | None] = [None] * len(sources)
    todo = iter(range(len(sources)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            results[i] = try_load(sources[i], timeout, max_bytes)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(sources)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results  # type: ignore[return-value]


def caption_sources(sources, model, processor, batch_size, timeout, generation_kwargs, progress=True,
                    max_bytes: int | None = None):
    """Yield (source, caption or Failure) in input order, batch by batch."""
    from modeling_clipcap.image_loading import DEFAULT_MAX_BYTES

    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    bar = tqdm(total=len(sources), desc="captioning", unit="img", disable=not progress)
    try:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            loaded = load_all(chunk, timeout, max_bytes)
            good = [(s, im) for s, im in zip(chunk, loaded) if isinstance(im, Image.Image)]
            captions: dict[str, str] = {}
            if good:
                pixel_values = processor(images=[im for _, im in good])["pixel_values"].to(model.device)
                ids = model.generate(pixel_values=pixel_values, **generation_kwargs)
                captions = dict(zip([s for s, _ in good], processor.batch_decode(ids)))
            for source, image in zip(chunk, loaded):
                yield source, captions.get(source, image)
            bar.update(len(chunk))
    finally:
        bar.close()


# -- output ------------------------------------------------------------------------------------------


class CaptionWriter:
    """Appends ``{"image", "caption"}`` rows to a .jsonl or .csv file, flushed row by row.

    Opening checks the file can be written (before any captioning). With ``resume``, the images
    already in the file are read into :attr:`done` (an incomplete last line, left by a kill in
    mid-write, is cut off); without it an existing non-empty file is refused unless ``overwrite``.
    """

    def __init__(self, path: Path, resume: bool = False, overwrite: bool = False):
        self.path, self.csv = path, path.suffix == ".csv"
        self.done: set[str] = set()
        self.dropped_partial = False
        try:
            if path.is_dir():
                raise OutputError(f"--output {path} is a folder; give a .jsonl or .csv file name")
            exists = path.is_file() and path.stat().st_size > 0
            if exists and resume:
                self._read_done()
            elif exists and not overwrite:
                raise OutputError(f"--output {path} already exists; pass --resume to skip the images it holds and "
                                  "add the rest, or --overwrite to start it again")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a" if exists and resume else "w", newline="" if self.csv else None,
                              encoding="utf-8")
        except OutputError:
            raise
        except OSError as error:
            raise OutputError(f"--output {path} cannot be written ({type(error).__name__}: "
                              f"{error.strerror or error}); choose a writable location") from error
        self._csv = csv.writer(self._file) if self.csv else None
        if self._csv is not None and not self.done and self._file.tell() == 0:
            self._csv.writerow(["image", "caption"])
            self._file.flush()

    def _read_done(self) -> None:
        raw = self.path.read_bytes()
        if not raw.endswith(b"\n"):  # a kill in mid-write: cut the incomplete row off
            cut = raw.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)
            raw, self.dropped_partial = raw[:cut], True
        text = raw.decode("utf-8")
        if self.csv:
            rows = list(csv.reader(text.splitlines()))
            if rows and rows[0] != ["image", "caption"]:
                raise OutputError(f"--output {self.path}: its first row is {rows[0]}, not image,caption; it was "
                                  "not written by inference.py, so --resume cannot continue it")
            self.done = {row[0] for row in rows[1:] if row}
            return
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.done.add(str(json.loads(line)["image"]))
            except (ValueError, KeyError, TypeError) as error:
                raise OutputError(f"--output {self.path}:{n} is not an inference.py row ({error}); fix or remove "
                                  "that line, or pass --overwrite to start again") from error

    def write(self, image: str, caption: str) -> None:
        if self._csv is not None:
            self._csv.writerow([image, caption])
        else:
            self._file.write(json.dumps({"image": image, "caption": caption}, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# -- command line ------------------------------------------------------------------------------------


def _positive(kind: type, what: str):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number; give {what}") from None
        if not number > 0:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; give {what}")
        return number

    return parse


def _check_model(value: str) -> str | None:
    """Why `--model` can be neither a local model nor a Hub repo id, or None."""
    if os.path.exists(os.path.expanduser(value)):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return (f"--model {value}: no such model folder, and not a Hub repo id ('name' or 'owner/name'); give an "
                "existing folder or a Hub id")
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders, glob patterns or http(s) URLs")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model folder or Hub id, ours or the authors' release layout (default: {DEFAULT_MODEL})")
    parser.add_argument("--num-beams", type=_positive(int, "a beam size of 1 or more (1 = greedy search)"),
                        default=None, help="beam size (default: the model's, 5)")
    parser.add_argument("--max-new-tokens", type=_positive(int, "a caption length of 1 token or more"),
                        default=None, help="caption length limit in tokens (default: the model's)")
    parser.add_argument("--batch-size", type=_positive(int, "1 or more images per forward pass"), default=16,
                        help="images per forward pass (default: 16)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weights dtype: auto = bfloat16 where the device runs it natively (CUDA with bf16, "
                             "CPUs with AMX / AVX-512 bf16), else float32 (default: auto)")
    parser.add_argument("--compile", action="store_true",
                        help="static KV cache + torch.compile for decoding: ~1.1x faster per batch after a 10-20 s "
                             "compile (worth it for many batches)")
    parser.add_argument("--timeout", type=_positive(float, "a number of seconds above 0"), default=20.0,
                        help="seconds for a whole URL download, connection to last byte (default: 20)")
    parser.add_argument("--max-image-mb", type=_positive(float, "a size in MB above 0"), default=50.0,
                        help="largest URL download accepted, in MiB (default: 50)")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the captions to a .jsonl or .csv file, row by row as they are made")
    parser.add_argument("--resume", action="store_true",
                        help="continue an existing --output file: skip the images already in it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.output is not None and args.output.suffix not in (".jsonl", ".csv"):
        parser.error(f"--output {args.output}: use a .jsonl or .csv file name")
    if args.resume and args.output is None:
        parser.error("--resume continues an --output file: give --output too")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other: choose one")
    problem = _check_model(args.model)
    if problem:
        parser.error(problem)
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device}: not a device name; use auto, cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device} was asked for, but CUDA is not available; use --device cpu")
    return args


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    writer = None
    if args.output is not None:
        try:
            writer = CaptionWriter(args.output, resume=args.resume, overwrite=args.overwrite)
        except OutputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None  # `kill` runs `finally`
    failures: list[Failure] = []
    captioned, status, interrupted = 0, 0, False
    try:
        sources, failures, skipped = expand_sources(args.inputs)
        report_skipped(skipped)
        if writer is not None and writer.done:
            before = len(sources)
            sources = [s for s in sources if s not in writer.done]
            print(f"resuming {args.output}: {before - len(sources)} image(s) already captioned there, "
                  f"{len(sources)} to go" + (" (an incomplete last row was removed)" if writer.dropped_partial
                                             else ""), file=sys.stderr)
        if sources:
            from metrics.clip_judge import resolve_device

            try:
                model, processor = load_captioner(args.model, resolve_device(args.device), args.dtype)
            except (OSError, ValueError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                print(f"error: --model {args.model}: cannot load it ({first})", file=sys.stderr)
                return 2
            generation_kwargs = {k: v for k, v in {"num_beams": args.num_beams,
                                                   "max_new_tokens": args.max_new_tokens}.items() if v is not None}
            if args.compile:
                generation_kwargs.update(compiled_generation_kwargs())
            max_bytes = int(args.max_image_mb * 1024 * 1024)
            for source, result in caption_sources(sources, model, processor, args.batch_size, args.timeout,
                                                  generation_kwargs, progress=not args.quiet, max_bytes=max_bytes):
                if isinstance(result, Failure):
                    failures.append(result)
                    continue
                if writer is not None:
                    writer.write(source, result)
                captioned += 1
                print(f"{source}\t{result}", flush=True)
        elif not failures and not (writer is not None and writer.done):
            print("no images found in the given inputs.", file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        interrupted, status = True, 130
    finally:
        if writer is not None:
            writer.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for failure in failures:
            print(f"error: {failure.source}: {failure.reason}", file=sys.stderr)
        if failures:
            print(f"{len(failures)} input(s) failed, {captioned} captioned.", file=sys.stderr)
        if interrupted:
            where = (f"; the {captioned} caption(s) of this run are in {args.output}: rerun the same command with "
                     "--resume to continue") if writer is not None else ""
            print(f"interrupted{where}.", file=sys.stderr)
    return status or (1 if failures else 0)


if __name__ == "__main__":
    sys.exit(main())
