"""Manual filtering of TrueMatch bags (NDLB paper Sec. 3.1: "a manual filtering process is
performed to retain only those bags that would require captioning systems to capture some
aspect of fine-grained visual discrimination", e.g. 680 -> 254 bags of size 3).

1. ``python -m datasets_scripts.review_bags TRUEMATCH_DIR --size 3 --out review_bags_3.html``
   writes one static HTML page (no server, no network: thumbnails are embedded as base64, or
   written beside the page with ``--link-images``) showing every bag's images and captions.
   Keep / drop each bag with the mouse or the keyboard (k keep, d drop, u undo, j / arrows to
   move, n next undecided). Progress is saved in the browser's localStorage under the page id
   (a hash of the config's bags), so closing and reopening the file continues where you were.
   "Export decisions" downloads a JSON file (also shown in the text box at the bottom, and
   returned by ``window.exportDecisions()``).
2. ``python -m datasets_scripts.review_bags apply TRUEMATCH_DIR --decisions review_bags_3.json
   --out TRUEMATCH_FINAL`` (or :func:`apply_review`) writes the final benchmark folder: dropped
   bags removed; bags left undecided are kept by default (``--undecided drop`` removes them,
   ``--undecided error`` refuses to apply while any bag is undecided). Bag ids are kept, so the
   final bags can be traced back to the mined ones. Configs without a decisions file are copied
   unchanged and marked "not reviewed" in the card.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal, Sequence

from tqdm.auto import tqdm

from common import not_found, read_json, write_json, write_text
from datasets_scripts.truematch import render_card

TEMPLATE = Path(__file__).with_name("templates") / "review.html"
FORMAT = "ndlb-truematch-review-v1"


def _parquet_path(truematch_dir: Path, size: int) -> Path:
    files = sorted((truematch_dir / f"bags_{size}").glob("*.parquet"))
    if not files:
        raise not_found(f"bags_{size}/*.parquet", truematch_dir,
                        "build it with `python -m datasets_scripts.truematch build`")
    if len(files) > 1:
        raise ValueError(f"{truematch_dir / f'bags_{size}'} holds {len(files)} parquet files; expected one")
    return files[0]


def available_sizes(truematch_dir: str | os.PathLike) -> list[int]:
    """Bag sizes with a ``bags_{s}/`` folder in a TrueMatch folder."""
    return sorted(int(p.name[5:]) for p in Path(truematch_dir).glob("bags_*") if p.name[5:].isdigit())


def read_bags(truematch_dir: str | os.PathLike, size: int):
    """The ``bags_{size}`` table (pyarrow, images not decoded)."""
    import pyarrow.parquet as pq

    return pq.read_table(_parquet_path(Path(truematch_dir), size))


def page_id(table, size: int) -> str:
    """Stable id of a config's content (bag ids + COCO ids): localStorage key and decisions check."""
    h = hashlib.sha256(f"bags_{size}".encode())
    for bid, cids in zip(table.column("bag_id").to_pylist(), table.column("cocoids").to_pylist()):
        h.update(json.dumps([bid, cids]).encode())
    return f"truematch-bags_{size}-{h.hexdigest()[:16]}"


def _thumbnail(image: dict[str, Any], base: Path, size: int) -> bytes:
    from metrics.image_loading import open_image

    if image.get("bytes") is not None:
        im = open_image(image["bytes"])
    else:
        path = Path(image["path"])
        im = open_image(path if path.is_absolute() else base / path)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_review_page(truematch_dir: str | os.PathLike, size: int, out: str | os.PathLike, *,
                      thumb_size: int = 224, link_images: bool = False, progress: bool = True) -> Path:
    """Write the static review page of ``bags_{size}`` to ``out`` (see the module docstring)."""
    tdir, out = Path(truematch_dir), Path(out)
    table = read_bags(tdir, size)
    pid = page_id(table, size)
    assets = out.with_name(out.stem + "_files")
    if link_images:
        assets.mkdir(parents=True, exist_ok=True)
    bags = []
    rows = table.to_pylist()
    for row in tqdm(rows, desc=f"Thumbnails bags_{size}", unit="bag", disable=not progress):
        srcs = []
        for cid, im in zip(row["cocoids"], row["images"]):
            thumb = _thumbnail(im, tdir, thumb_size)
            if link_images:
                (assets / f"{cid}.jpg").write_bytes(thumb)
                srcs.append(f"{assets.name}/{cid}.jpg")
            else:
                srcs.append("data:image/jpeg;base64," + base64.b64encode(thumb).decode())
        bags.append({"bag_id": row["bag_id"], "cocoids": row["cocoids"], "alpha": row["alpha"],
                     "captions": row["captions"], "images": srcs})
    data = {"page_id": pid, "config": f"bags_{size}", "bag_size": size, "bags": bags}
    payload = json.dumps(data).replace("</", "<\\/").replace("<!--", "<\\u0021--")
    page = (TEMPLATE.read_text(encoding="utf-8").replace("__TITLE__", html.escape(f"bags_{size}"))
            .replace("__THUMB__", str(int(thumb_size))).replace("__DATA__", payload))
    return write_text(out, page)


def _read_decisions(d: str | os.PathLike | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(d, dict):
        return d, "<dict>"
    return read_json(d, "decisions file"), str(d)


def apply_review(truematch_dir: str | os.PathLike,
                 decisions: str | os.PathLike | dict | Sequence[str | os.PathLike | dict],
                 out_dir: str | os.PathLike, *, undecided: Literal["keep", "drop", "error"] = "keep",
                 overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Turn exported review decisions into the final TrueMatch folder.

    Args:
        truematch_dir: the mined folder (``python -m datasets_scripts.truematch build``).
        decisions: one or more exported decision files (or dicts), at most one per config.
        out_dir: the final folder (a new folder; same layout, card and authors' json files).
        undecided: what happens to bags without a decision: "keep" (default), "drop", or
            "error" (refuse while any bag is undecided).
        overwrite: replace ``out_dir`` if it exists.

    Returns:
        Per reviewed size: ``{"n_before", "kept", "dropped", "undecided", "undecided_policy"}``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if undecided not in ("keep", "drop", "error"):
        raise ValueError(f"undecided must be 'keep', 'drop' or 'error', got {undecided!r}")
    tdir, out = Path(truematch_dir), Path(out_dir)
    if out.resolve() == tdir.resolve():
        raise ValueError("out_dir must differ from truematch_dir (the mined folder stays untouched)")
    info_path = tdir / "mining_info.json"
    info = read_json(info_path, "mining_info.json", f"{tdir} to be a folder written by datasets_scripts.truematch")
    if out.exists() and any(out.iterdir()):
        if not (out / "mining_info.json").exists():  # never replace a folder that is not a TrueMatch folder
            raise FileExistsError(f"{out} exists and is not a TrueMatch folder; choose another --out")
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) or choose another --out")
    items = [decisions] if isinstance(decisions, (str, os.PathLike, dict)) else list(decisions)

    by_size: dict[int, tuple[dict[str, Any], str]] = {}
    for d in items:
        obj, name = _read_decisions(d)
        if obj.get("format") != FORMAT or not isinstance(obj.get("decisions"), dict):
            raise ValueError(f"{name}: not a TrueMatch review export (format {FORMAT!r} with a 'decisions' object)")
        size = int(obj["bag_size"])
        if size in by_size:
            raise ValueError(f"{name}: a second decisions file for bags_{size} ({by_size[size][1]})")
        by_size[size] = (obj, name)

    summary: dict[str, dict[str, Any]] = {}
    tables: dict[int, Any] = {}
    for size, (obj, name) in by_size.items():
        table = read_bags(tdir, size)
        if obj.get("page_id") != page_id(table, size):
            raise ValueError(f"{name}: exported from another version of bags_{size} (page id {obj.get('page_id')}, "
                             f"this folder's is {page_id(table, size)}); regenerate the review page")
        ids = table.column("bag_id").to_pylist()
        known = {str(i) for i in ids}
        unknown = sorted(set(obj["decisions"]) - known)
        if unknown:
            raise ValueError(f"{name}: unknown bag ids {unknown[:20]} for bags_{size}")
        bad = {k: v for k, v in obj["decisions"].items() if v not in ("keep", "drop")}
        if bad:
            raise ValueError(f"{name}: decisions must be 'keep' or 'drop', got {dict(list(bad.items())[:5])}")
        dec = [obj["decisions"].get(str(i)) for i in ids]
        n_undecided = sum(d is None for d in dec)
        if n_undecided and undecided == "error":
            raise ValueError(f"{name}: {n_undecided} of {len(ids)} bags of bags_{size} are undecided; finish the "
                             "review or pass --undecided keep|drop")
        keep = [d == "keep" or (d is None and undecided == "keep") for d in dec]
        tables[size] = table.filter(pa.array(keep))
        summary[str(size)] = {"n_before": len(ids), "kept": sum(keep), "dropped": sum(d == "drop" for d in dec),
                              "undecided": n_undecided, "undecided_policy": undecided}

    # everything is validated: write into a temporary sibling folder, then swap it in
    final, out = out, out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for size in info["sizes"]:
        src = _parquet_path(tdir, size)
        dst = out / f"bags_{size}" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if size in tables:
            pq.write_table(tables[size], dst)  # keeps the schema's datasets features metadata
            kept_ids = tables[size].column("cocoids").to_pylist()
            alphas = tables[size].column("alpha").to_pylist()
            write_json(out / "review" / f"decisions_bags_{size}.json", by_size[size][0], indent=1)
        else:
            shutil.copyfile(src, dst)
            kept_ids = read_json(tdir / f"{size}.json")
            alphas = read_json(tdir / f"alpha_{size}.json")
        write_json(out / f"{size}.json", kept_ids, indent=None)
        write_json(out / f"alpha_{size}.json", alphas, indent=None)
    info = {**info, "review": {**(info.get("review") or {}), **summary}}
    write_json(out / "mining_info.json", info)
    write_text(out / "README.md", render_card(info))
    if final.exists():
        shutil.rmtree(final)
    os.replace(out, final)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["apply"]:
        p = argparse.ArgumentParser(prog="python -m datasets_scripts.review_bags apply",
                                    description="Apply exported review decisions: write the final TrueMatch folder.")
        p.add_argument("truematch_dir", help="mined TrueMatch folder")
        p.add_argument("--decisions", nargs="+", required=True, help="exported decision JSON file(s), one per size")
        p.add_argument("--out", required=True, help="final TrueMatch folder")
        p.add_argument("--undecided", choices=["keep", "drop", "error"], default="keep",
                       help="bags without a decision: keep (default), drop, or error")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        args = p.parse_args(argv[1:])
        try:
            summary = apply_review(args.truematch_dir, args.decisions, args.out, undecided=args.undecided,
                                   overwrite=args.overwrite)
        except (FileExistsError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for s, r in summary.items():
            print(f"bags_{s}: {r['n_before']} -> {r['kept']} (dropped {r['dropped']}, "
                  f"undecided {r['undecided']}: {r['undecided_policy']})")
        print(f"wrote {args.out}")
        return 0

    p = argparse.ArgumentParser(
        prog="python -m datasets_scripts.review_bags",
        description="Write a static HTML page to keep/drop TrueMatch bags by hand "
                    "(then: python -m datasets_scripts.review_bags apply ...).")
    p.add_argument("truematch_dir", help="TrueMatch folder (python -m datasets_scripts.truematch build)")
    p.add_argument("--size", type=int, help="bag size to review (default: every size, one page each)")
    p.add_argument("--out", help="HTML file (default review_bags_{size}.html in the current folder)")
    p.add_argument("--thumb-size", type=int, default=224, help="thumbnail size in pixels (default 224)")
    p.add_argument("--link-images", action="store_true",
                   help="write thumbnails beside the page (OUT_files/) instead of embedding them")
    args = p.parse_args(argv)
    try:
        sizes = [args.size] if args.size else available_sizes(args.truematch_dir)
        if not sizes:
            raise FileNotFoundError(f"no bags_*/ folders in {args.truematch_dir}")
        if args.out and len(sizes) > 1:
            raise ValueError(f"{args.truematch_dir} has sizes {sizes}: pass --size with --out")
        for s in sizes:
            out = write_review_page(args.truematch_dir, s, args.out or f"review_bags_{s}.html",
                                    thumb_size=args.thumb_size, link_images=args.link_images)
            print(f"wrote {out}: open it in a browser (file://{out.resolve()})")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["apply_review", "available_sizes", "main", "page_id", "read_bags", "write_review_page"]

if __name__ == "__main__":
    sys.exit(main())
