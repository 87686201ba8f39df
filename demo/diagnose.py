"""Why the hardest TrueMatch bags of the synthetic world stay hard: three measurements on a finished
demo folder.

    python -m demo.diagnose --out demo_out           # writes demo_out/diagnosis.json

1. ``caption_bound`` — the TrueMatch R@1 (NDLB Sec. 3.1) that an ideal captioner could reach under
   the demo's caption length limit: for every member of a bag, the best caption of at most
   ``caption_tokens`` tokens built from that image's own details (any subset of its objects, each
   with or without size, colour and position, with or without the background; the world's
   canonical words), chosen by the evaluation judge within the bag. If this bound is high while the
   trained captioners stay low, the length limit is not what holds them back.
2. ``shape_naming`` — how often a caption that names a colour followed by a shape ("a red ring")
   names the shape of the object that really has that colour, by object size and by the number of
   objects in the scene (the world's ground truth; only colours that one object of the scene has).
3. ``judge_probes`` — what the judges' image embeddings encode: small MLP probes trained on the
   train split's embeddings predict, for the test split, the set of colours, the set of shapes, the
   set of (colour, shape) pairs and the set of occupied cells. The same probes on judge A's patch
   tokens (the vision tower before pooling) and on raw pixels frame the numbers: what is lost in
   pooling, and what a probe can read from the picture at all.

Numbers are exact-set accuracies (every member of the set right) and recall (share of the true
members the probe finds), on the test split.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["caption_bound", "candidate_captions", "diagnose", "judge_probes", "probe", "shape_naming",
           "attribute_targets", "main"]


# -- 1. the caption-length bound --------------------------------------------------------------------

def candidate_captions(scene, tokenizer, max_tokens: int) -> list[str]:
    """Every caption of at most ``max_tokens`` tokens that names a subset of the scene's own details
    in the world's canonical words: "a small red ring at the top left and a blue bar on grey."."""
    from demo.world import CELLS, POSITION_PHRASES

    per_object = []
    for o in scene.objects:
        options = [None]
        for size, colour, position in itertools.product((False, True), repeat=3):
            phrase = "a " + " ".join(([o.size] if size else []) + ([o.colour] if colour else []) + [o.shape])
            if position:
                phrase += " " + POSITION_PHRASES[CELLS[o.cell]][0]
            options.append(phrase)
        per_object.append(options)
    captions = set()
    for combo in itertools.product(*per_object):
        parts = [c for c in combo if c]
        for background in (False, True):
            if not parts and not background:
                continue
            body = " and ".join(parts) if parts else "a picture"
            text = body + (f" on {scene.background}" if background else "") + "."
            if len(tokenizer(text)["input_ids"]) <= max_tokens:
                captions.add(text)
    return sorted(captions)


@torch.no_grad()
def caption_bound(split, bags: list[list[int]], judge, tokenizer, max_tokens: int,
                  progress: bool = True) -> dict[str, float]:
    """R@1 (percent) over the bag members when each member gets its best candidate caption
    (:func:`candidate_captions`): the own image must score strictly above every bag-mate."""
    from tqdm.auto import tqdm

    from demo.world import Scene
    from metrics.clip_judge import similarity

    row_of = {int(c): r for r, c in enumerate(split["cocoid"])}
    scenes = split["scene"]
    hits, sizes = [], []
    for bag in tqdm(bags, desc="caption bound", unit="bag", disable=not progress):
        rows = [row_of[int(c)] for c in bag]
        images = judge.embed_images([split[r]["image"] for r in rows])
        for k, r in enumerate(rows):
            captions = candidate_captions(Scene.from_json(scenes[r]), tokenizer, max_tokens)
            sim = similarity(judge.embed_texts(captions), images)  # (C, s)
            others = torch.cat([sim[:, :k], sim[:, k + 1:]], 1).amax(1)
            hits.append(bool((sim[:, k] - others).max() > 0))
            sizes.append(len(captions))
    return {"r1": 100.0 * float(np.mean(hits)), "members": len(hits), "candidates_per_member": float(np.mean(sizes))}


# -- 2. naming the right shape ------------------------------------------------------------------------

def shape_naming(captions: list[str], scenes) -> dict[str, dict[str, float]]:
    """Accuracy of "<colour> <shape>" mentions against the object of that colour, overall and by
    ``<size>_<number of objects>`` (e.g. ``small_3``). Mentions of a colour that no object or
    several objects of the scene have are skipped."""
    from demo.world import COLOURS, SHAPES, Scene

    canonical = {word: shape for shape, words in SHAPES.items() for word in words}
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for caption, scene in zip(captions, scenes):
        scene = scene if not isinstance(scene, str) else Scene.from_json(scene)
        words = caption.lower().replace(".", " ").replace(",", " ").split()
        for colour, noun in zip(words, words[1:]):
            if colour not in COLOURS or noun not in canonical:
                continue
            owners = [o for o in scene.objects if o.colour == colour]
            if len(owners) != 1:
                continue
            right = int(canonical[noun] == owners[0].shape)
            for key in ("all", f"{owners[0].size}_{len(scene.objects)}"):
                counts[key][0] += right
                counts[key][1] += 1
    return {k: {"accuracy": v[0] / v[1], "mentions": v[1]} for k, v in sorted(counts.items())}


# -- 3. what the judges' embeddings encode ------------------------------------------------------------

PROBE_TARGETS = ("colour_set", "shape_set", "colour_shape_pairs", "occupied_cells")


def attribute_targets(scenes) -> dict[str, torch.Tensor]:
    """Multi-hot ground truth per scene: colours (8), shapes (4), (colour, shape) pairs (32) and
    occupied cells (4)."""
    from demo.world import CELLS, COLOURS, SHAPES, Scene

    shapes, colours = list(SHAPES), list(COLOURS)
    out = {k: torch.zeros(len(scenes), n) for k, n in zip(
        PROBE_TARGETS, (len(colours), len(shapes), len(colours) * len(shapes), len(CELLS)))}
    for i, scene in enumerate(scenes):
        scene = scene if not isinstance(scene, str) else Scene.from_json(scene)
        for o in scene.objects:
            s, c = shapes.index(o.shape), colours.index(o.colour)
            out["colour_set"][i, c] = 1
            out["shape_set"][i, s] = 1
            out["colour_shape_pairs"][i, c * len(shapes) + s] = 1
            out["occupied_cells"][i, o.cell] = 1
    return out


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          epochs: int = 40, seed: int = 0) -> dict[str, float]:
    """A one-hidden-layer MLP probe (standardised inputs, multi-label logistic loss) fitted on the
    train features; exact-set accuracy and recall on the test features."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    net = torch.nn.Sequential(torch.nn.Linear(train_x.shape[1], 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, train_y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    x = (train_x - mean) / std
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 128):
            rows = order[start : start + 128]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[rows]), train_y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        predicted = net((test_x - mean) / std) > 0
    truth = test_y > 0
    return {"exact": float((predicted == truth).all(1).float().mean()), "recall": float(predicted[truth].float().mean())}


@torch.no_grad()
def _vision_features(folder: Path, splits, image_size: int) -> list[dict[str, torch.Tensor]]:
    """Judge A's vision tower, loaded once: per split, the patch tokens (flattened, before pooling)
    and the raw pixels of every image."""
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    from demo.judges import pixel_tensor

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the judge folder also holds the text tower: "unexpected keys"
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(str(folder)).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    out = []
    for split in splits:
        pixels = pixel_tensor(split["image"], image_size)
        tokens = [model(pixel_values=pixels[s : s + 500]).last_hidden_state[:, 1:].flatten(1)
                  for s in range(0, len(pixels), 500)]
        out.append({"tokens": torch.cat(tokens), "pixels": pixels.flatten(1)})
    return out


def judge_probes(world, judges: dict, vision_folder: Path | None, image_size: int,
                 epochs: int = 40, progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """Probe results per feature source (``judge A``, ``judge B``, ``judge A patch tokens``,
    ``pixels``) and target (:data:`PROBE_TARGETS`). ``judges``: name -> loaded ``ClipJudge``."""
    from tqdm.auto import tqdm

    train, test = world["train"], world["test"]
    y_train, y_test = attribute_targets(train["scene"]), attribute_targets(test["scene"])
    sources: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, judge in judges.items():
        sources[f"judge {name} embedding"] = (judge.embed_images(list(train["image"])).float(),
                                              judge.embed_images(list(test["image"])).float())
    if vision_folder is not None:
        a, b = _vision_features(vision_folder, (train, test), image_size)
        sources["judge A patch tokens"] = (a["tokens"], b["tokens"])
        sources["pixels"] = (a["pixels"], b["pixels"])
    out: dict[str, dict[str, dict[str, float]]] = {}
    jobs = [(s, t) for s in sources for t in PROBE_TARGETS]
    for source, target in tqdm(jobs, desc="embedding probes", unit="probe", disable=not progress):
        x_train, x_test = sources[source]
        out.setdefault(source, {})[target] = probe(x_train, y_train[target], x_test, y_test[target], epochs=epochs)
    return out


# -- the whole diagnosis ------------------------------------------------------------------------------

def diagnose(out: str | Path, sizes=(3,), max_bags: int | None = None, probe_epochs: int = 40,
             probes: bool = True, progress: bool = True) -> dict[str, Any]:
    """All three measurements on a finished demo folder; also written to ``out/diagnosis.json``."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from datasets_scripts.truematch import read_authors_bags
    from common import write_json
    from demo.run import Paths
    from metrics.clip_judge import ClipJudge

    p = Paths(Path(out))
    if not (p.out / "results.json").is_file():
        raise FileNotFoundError(f"{p.out / 'results.json'} not found: run `python -m demo.run --out {p.out}` first")
    config = json.loads((p.out / "demo_config.json").read_text())
    world = load_from_disk(str(p.world))
    test = world["test"]
    tokenizer = AutoTokenizer.from_pretrained(str(p.tokenizer))
    judge_b = ClipJudge.from_pretrained(str(p.judge_b), device="cpu")
    result: dict[str, Any] = {"caption_tokens": config["caption_tokens"], "caption_bound": {}, "truematch_r1": {}}
    results = json.loads((p.out / "results.json").read_text())
    for s in sizes:
        bags = read_authors_bags(p.truematch / f"{s}.json")[:max_bags]
        result["caption_bound"][str(s)] = caption_bound(test, bags, judge_b, tokenizer, config["caption_tokens"],
                                                        progress=progress)
        result["truematch_r1"][str(s)] = {name: row[f"truematch_r1_{s}"] for name, row in results.items()
                                          if isinstance(row, dict) and f"truematch_r1_{s}" in row}
    ids = [str(i) for i in test["cocoid"]]
    result["shape_naming"] = {}
    for file in sorted(p.captions.glob("*.json")):
        captions = json.loads(file.read_text())
        result["shape_naming"][file.stem] = shape_naming([captions[i] for i in ids], test["scene"])
    if probes:
        judge_a = ClipJudge.from_pretrained(str(p.judge_a), device="cpu")
        result["judge_probes"] = judge_probes(world, {"A": judge_a, "B": judge_b}, p.judge_a,
                                              config["image_size"], epochs=probe_epochs, progress=progress)
    write_json(p.out / "diagnosis.json", result)
    return result


def _summary(result: dict[str, Any]) -> str:
    lines = []
    for s, bound in result["caption_bound"].items():
        best = max(result["truematch_r1"][s].items(), key=lambda kv: kv[1]) if result["truematch_r1"][s] else ("-", 0)
        lines.append(f"bags of {s}: best caption of <= {result['caption_tokens']} tokens reaches R@1 "
                     f"{bound['r1']:.1f} (judge B, {bound['members']} members); best trained system "
                     f"{best[0]} {best[1]:.1f}")
    for name, rows in result["shape_naming"].items():
        if "all" in rows:
            detail = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in rows.items() if k != "all")
            lines.append(f"shape named right for its colour, {name}: {rows['all']['accuracy']:.2f} ({detail})")
    for source, targets in result.get("judge_probes", {}).items():
        detail = ", ".join(f"{t} {v['exact']:.2f}/{v['recall']:.2f}" for t, v in targets.items())
        lines.append(f"probe on {source} (exact/recall): {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.diagnose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="A finished demo folder (default: demo_out).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[3], help="Bag sizes for the caption bound.")
    parser.add_argument("--max_bags", type=int, default=None, help="Use only the first N bags of each size.")
    parser.add_argument("--probe_epochs", type=int, default=40, help="Training epochs of each probe.")
    parser.add_argument("--no_probes", action="store_true", help="Skip the embedding probes.")
    args = parser.parse_args(argv)
    try:
        result = diagnose(args.out, args.sizes, args.max_bags, args.probe_epochs, probes=not args.no_probes)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_summary(result))
    print(f"wrote {Path(args.out) / 'diagnosis.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
