"""Caption your own images with a ClipCap model.

    python inference.py photo.jpg holiday/ "scans/*.png" https://example.com/cat.jpg \
        [--model ID_OR_PATH] [--num-beams 5] [--batch-size 16] [--device auto|cpu|cuda] \
        [--output captions.jsonl|captions.csv]

Inputs may be files, folders (searched recursively for images), glob patterns and http(s) URLs.
A model folder or Hub repo in the authors' release layout (``manu-gaur/NDLB``) is detected and
converted on the fly. Files that cannot be read as images are reported by name and skipped; the
others are still captioned, and the exit status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DEFAULT_MODEL = "manu-gaur/NDLB"


@dataclass
class Failure:
    source: str
    reason: str


def expand_sources(sources: list[str]) -> tuple[list[str], list[Failure]]:
    """Files, folders (recursive), globs and URLs → ordered, de-duplicated list of image sources."""
    found: list[str] = []
    failures: list[Failure] = []
    for source in sources:
        if source.startswith(("http://", "https://")):
            found.append(source)
            continue
        path = Path(source)
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(str(path))
        elif glob.has_magic(source):
            matches = sorted(p for p in glob.glob(source, recursive=True) if Path(p).is_file())
            if not matches:
                failures.append(Failure(source, "the pattern matches no file"))
            found += matches
        else:
            failures.append(Failure(source, "no such file, folder or URL"))
    return list(dict.fromkeys(found)), failures


def try_load(source: str, timeout: float) -> Image.Image | Failure:
    """The decoded image (a local file or an http(s) URL), or a Failure naming what went wrong."""
    from modeling_clipcap.pipeline_clipcap import open_image

    try:
        return open_image(source, timeout=timeout)
    except Exception as error:  # PIL (corrupt/unknown data), OSError, httpx network and HTTP errors
        return Failure(source, f"{type(error).__name__}: {error}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for, but CUDA is not available; use --device cpu.")
    return torch.device(name)


def load_captioner(name_or_path: str, device: torch.device):
    """(model, processor) from our format, or from the authors' release layout (converted)."""
    import modeling_clipcap  # noqa: F401  (registers the Auto classes)
    from modeling_clipcap import ClipCapForCaptioning
    from modeling_clipcap.convert_ndlb import ensure_converted

    folder = ensure_converted(name_or_path)
    from transformers import AutoProcessor

    model = ClipCapForCaptioning.from_pretrained(folder).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


def caption_sources(sources, model, processor, batch_size, timeout, generation_kwargs, progress=True):
    """Yield (source, caption or Failure) in input order, batch by batch."""
    pool = ThreadPoolExecutor(max_workers=8)
    bar = tqdm(total=len(sources), desc="captioning", unit="img", disable=not progress)
    try:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            loaded = list(pool.map(lambda s: try_load(s, timeout), chunk))
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
        pool.shutdown()


def write_output(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders, glob patterns or http(s) URLs")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model folder or Hub id, ours or the authors' release layout (default: {DEFAULT_MODEL})")
    parser.add_argument("--num-beams", type=int, default=None, help="beam size (default: the model's, 5)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="caption length limit (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for a URL (default: 20)")
    parser.add_argument("--output", type=Path, default=None, help="also write the captions to a .jsonl or .csv file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.output is not None and args.output.suffix not in (".jsonl", ".csv", ".json"):
        parser.error(f"--output {args.output}: use a .jsonl or .csv file name")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sources, failures = expand_sources(args.inputs)
    device = resolve_device(args.device)
    rows: list[dict] = []
    if sources:
        model, processor = load_captioner(args.model, device)
        generation_kwargs = {k: v for k, v in {"num_beams": args.num_beams,
                                               "max_new_tokens": args.max_new_tokens}.items() if v is not None}
        for source, result in caption_sources(sources, model, processor, args.batch_size, args.timeout,
                                              generation_kwargs, progress=not args.quiet):
            if isinstance(result, Failure):
                failures.append(result)
            else:
                rows.append({"image": source, "caption": result})
                print(f"{source}\t{result}", flush=True)
    if args.output is not None:
        write_output(args.output, rows)
    for failure in failures:
        print(f"error: {failure.source}: {failure.reason}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} input(s) failed, {len(rows)} captioned.", file=sys.stderr)
    elif not rows:
        print("no images found in the given inputs.", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
