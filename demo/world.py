"""A procedural world of simple scenes with references at two levels of detail (the offline
stand-in for COCO + Visual Caption Boost, NDLB Sec. 3-4).

Each image is a small RGB picture (32 x 32 px by default) of 1-3 objects on a background. The
canvas is a 2 x 2 grid of cells; every object sits at the centre of its own cell, and has a
shape (4: circle, ring, horizontal bar, vertical pillar), a colour (8) and a size (2). The background has one of 4 colours, a random gradient and
pixel noise. That is up to 3 x 4 object attributes plus the count and the background, far more than
a caption of ``CAPTION_TOKENS`` tokens can name, so a captioner has to *select* details — the
situation in which hard negatives and a bag curriculum (NDLB Sec. 4.6) can matter.

For every image the world writes

* five sparse "human" references (column ``captions``), each naming only some details, with
  synonyms and varied word order, and more often the large objects (as COCO annotators mention
  salient objects, NDLB Sec. 3.2, Fig. 2);
* one complete description (column ``complete``) naming every attribute of every object, the
  analogue of a HolisticCap caption of Visual Caption Boost (NDLB Sec. 3.2);
* the scene itself as JSON (column ``scene``), used to score faithfulness of captions.

Why 32 px, and why objects sit at the centre of their cells: the captioner's vision tower is a ViT
trained from scratch with the judge, and all of the method (two judges, two MLE runs, four SR runs,
evaluation) must fit in ~15 CPU minutes on 2 cores. At 32 px with 8 px patches a ViT sees 2 x 2
patches per cell, and with the object centred each patch holds a fixed quarter of its shape. With
objects jittered inside their cells (``JITTER = 0.45``, an earlier version), judges trained for two
CPU minutes learned colours but hardly shapes (``python -m demo.diagnose``: the set of shapes
could be read from judge A's embedding for 24 % of the test images, against 89 % now), and neither
the captioner nor the reward could tell bag-mates apart by shape.

Everything is deterministic given the seed (numpy ``default_rng``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "CAPTION_TOKENS",
    "COLOURS",
    "CELLS",
    "SHAPES",
    "SIZES",
    "Obj",
    "Scene",
    "complete_description",
    "generate_world",
    "mentioned_attributes",
    "render",
    "sample_scene",
    "scene_attributes",
    "sparse_references",
    "train_tokenizer",
    "twin",
    "twin_kind",
    "world_texts",
]

# -- the world's vocabulary ----------------------------------------------------------------------

SHAPES = {  # canonical name -> synonyms used by the "human" references (the first one 75 % of the time)
    "circle": ["circle", "disc", "ball"],
    "ring": ["ring", "hoop"],
    "bar": ["bar", "stripe"],
    "pillar": ["pillar", "column"],
}
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 230), "yellow": (240, 220, 30),
    "purple": (140, 40, 190), "orange": (250, 140, 20), "pink": (250, 130, 190), "cyan": (40, 220, 230),
}
BACKGROUNDS = {"black": (25, 25, 25), "white": (235, 235, 235), "grey": (125, 125, 125), "brown": (115, 75, 40)}
SIZES = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
CELLS = ["top left", "top right", "bottom left", "bottom right"]  # 2 x 2 grid, reading order
POSITION_PHRASES = {
    "top left": ["at the top left", "in the top left corner", "in the upper left"],
    "top right": ["at the top right", "in the top right corner", "in the upper right"],
    "bottom left": ["at the bottom left", "in the bottom left corner", "in the lower left"],
    "bottom right": ["at the bottom right", "in the bottom right corner", "in the lower right"],
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
NOUNS = ["shape", "object"]

CAPTION_TOKENS = 16  # the caption length limit of the demo (max_new_tokens), chosen on val bags (demo.select); a complete description: 24 on average

# object radius in pixels at 32 px (scaled with the image size)
_RADIUS = {"small": 4.2, "large": 7.0}
# how far an object may stray from its cell's centre, as a fraction of the free room around it
# (0: centred; see the module docstring)
JITTER = 0.0


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # index into CELLS


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]  # sorted by cell (reading order)
    seed: int  # rendering noise / jitter

    def to_json(self) -> str:
        return json.dumps({"background": self.background, "objects": [asdict(o) for o in self.objects],
                           "seed": self.seed})

    @classmethod
    def from_json(cls, text: str) -> Scene:
        d = json.loads(text)
        return cls(d["background"], tuple(Obj(**o) for o in d["objects"]), int(d["seed"]))


def sample_scene(rng: np.random.Generator, count_probs: tuple[float, float, float] = (0.2, 0.35, 0.45)) -> Scene:
    """A random scene: 1-3 objects in distinct cells, attributes uniform, a background."""
    n = int(rng.choice([1, 2, 3], p=count_probs))
    cells = sorted(rng.choice(len(CELLS), size=n, replace=False).tolist())
    shapes, colours, sizes = list(SHAPES), list(COLOURS), list(SIZES)
    objects = tuple(Obj(shapes[rng.integers(len(shapes))], colours[rng.integers(len(colours))],
                        sizes[rng.integers(len(sizes))], int(c)) for c in cells)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return Scene(background, objects, int(rng.integers(2**31)))


# -- rendering -----------------------------------------------------------------------------------

def render(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """Draw a scene: gradient + noise background, then each object in its cell (anti-aliased)."""
    rng = np.random.default_rng(scene.seed)
    big = size * supersample
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    ramp = np.linspace(-1, 1, big, dtype=np.float32)[:, None, None] * rng.uniform(-18, 18)
    canvas = np.clip(base[None, None, :] + ramp + np.zeros((big, big, 3), np.float32), 0, 255)
    image = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cell = big / 2
    for obj in scene.objects:
        row, col = divmod(obj.cell, 2)
        r = _RADIUS[obj.size] * size / 32 * supersample
        jitter = (cell / 2 - r) * JITTER
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        colour = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLOURS[obj.colour])
        if obj.shape == "circle":  # a filled disc
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif obj.shape == "ring":  # a hollow circle
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(1, round(r * 0.4)))
        elif obj.shape == "bar":  # a horizontal rectangle
            draw.rectangle([cx - r, cy - r * 0.42, cx + r, cy + r * 0.42], fill=colour)
        elif obj.shape == "pillar":  # a vertical rectangle
            draw.rectangle([cx - r * 0.42, cy - r, cx + r * 0.42, cy + r], fill=colour)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    image = image.resize((size, size), Image.Resampling.BOX)
    noise = rng.normal(0, 5, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


# -- text ----------------------------------------------------------------------------------------

def _object_phrase(obj: Obj, position: bool = True) -> str:
    """Canonical full phrase: "a small red circle at the top left"."""
    phrase = f"a {obj.size} {obj.colour} {obj.shape}"
    return f"{phrase} {POSITION_PHRASES[CELLS[obj.cell]][0]}" if position else phrase


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def complete_description(scene: Scene) -> str:
    """Every attribute of every object, in reading order, then the background (the HolisticCap
    analogue): "a small red circle at the top left and a large blue cross at the bottom right on a
    grey background."."""
    return f"{_join([_object_phrase(o) for o in scene.objects])} on a {scene.background} background."


def _synonym(options: list[str], rng: np.random.Generator) -> str:
    """The first (canonical) word 75 % of the time, else one of the others."""
    if len(options) == 1 or rng.random() < 0.75:
        return options[0]
    return options[1 + rng.integers(len(options) - 1)]


def _sparse_object(obj: Obj, rng: np.random.Generator, p_colour: float, p_size: float, p_pos: float,
                   front: bool = True) -> str:
    """A partial mention of one object with synonyms: colour / size / position each maybe."""
    words = []
    if rng.random() < p_size:
        words.append(_synonym(SIZES[obj.size], rng))
    if rng.random() < p_colour:
        words.append(obj.colour)
    noun = _synonym(SHAPES[obj.shape], rng) if (rng.random() < 0.85 or not words) else rng.choice(NOUNS)
    words.append(noun)
    phrase = " ".join(words)
    article = "an" if phrase[0] in "aeiou" else "a"
    phrase = f"{article} {phrase}"
    if rng.random() < p_pos:
        where = rng.choice(POSITION_PHRASES[CELLS[obj.cell]])
        phrase = f"{where} there is {phrase}" if front and rng.random() < 0.3 else f"{phrase} {where}"
    return phrase


def _count_phrase(n: int, rng: np.random.Generator) -> str:
    if n == 1:
        return rng.choice(["a single shape", "one shape", "a single object"])
    return f"{COUNT_WORDS[n]} {rng.choice(['shapes', 'objects'])}"


def _background_phrase(scene: Scene, rng: np.random.Generator) -> str:
    return rng.choice([f"on a {scene.background} background", f"against {scene.background}",
                       f"on {scene.background}"])


def sparse_references(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` short references, each naming a few details (COCO-like), with synonyms and varied
    word order. Large objects are mentioned twice as often as small ones."""
    objs = list(scene.objects)
    weights = np.array([2.0 if o.size == "large" else 1.0 for o in objs])
    refs = []
    for _ in range(n):
        style = rng.choice(["one", "one", "two", "count", "scene"]) if len(objs) > 1 else \
            rng.choice(["one", "one", "count", "scene"])
        if style == "count":
            text = _count_phrase(len(objs), rng)
            if rng.random() < 0.5:
                text += " " + _background_phrase(scene, rng)
            else:
                o = objs[rng.choice(len(objs), p=weights / weights.sum())]
                text += f" including {_sparse_object(o, rng, 0.8, 0.2, 0.0)}"
        elif style == "scene":
            o = objs[rng.choice(len(objs), p=weights / weights.sum())]
            text = rng.choice([f"a {scene.background} picture with {_sparse_object(o, rng, 0.7, 0.2, 0.2, False)}",
                               f"{_sparse_object(o, rng, 0.7, 0.3, 0.2)} {_background_phrase(scene, rng)}"])
        else:
            k = 1 if style == "one" else 2
            chosen = sorted(rng.choice(len(objs), size=k, replace=False, p=weights / weights.sum()).tolist())
            text = " and ".join(_sparse_object(objs[j], rng, 0.7, 0.3, 0.35 if k == 1 else 0.15) for j in chosen)
            if rng.random() < 0.15:
                text += " " + _background_phrase(scene, rng)
        refs.append(text + ".")
    return refs


def mentioned_attributes(caption: str) -> set[tuple[str, str]]:
    """Attribute words a caption uses, canonicalised: {("colour", "red"), ("shape", "circle"),
    ("size", "large"), ("position", "top left"), ("background", "grey")...}. Used to measure
    faithfulness (every mentioned attribute exists in the scene) without a judge."""
    text = " " + caption.lower().replace(".", " ").replace(",", " ") + " "
    found: set[tuple[str, str]] = set()
    for canon, synonyms in SHAPES.items():
        if any(f" {s} " in text for s in synonyms):
            found.add(("shape", canon))
    for canon, synonyms in SIZES.items():
        if any(f" {s} " in text for s in synonyms):
            found.add(("size", canon))
    for cell, phrases in POSITION_PHRASES.items():
        if any(p in text for p in phrases):
            found.add(("position", cell))
    for colour in COLOURS:
        if f" {colour} " in text:
            kind = "background" if any(f"{colour} {w}" in text for w in ("background", "picture")) else "colour"
            found.add((kind, colour))
    for bg in BACKGROUNDS:
        if f" {bg} " in text:
            found.add(("background", bg))
    return found


def scene_attributes(scene: Scene) -> set[tuple[str, str]]:
    """The attributes present in a scene, in the vocabulary of :func:`mentioned_attributes`."""
    out = {("background", scene.background)}
    for o in scene.objects:
        out |= {("shape", o.shape), ("colour", o.colour), ("size", o.size), ("position", CELLS[o.cell])}
    return out


# -- the dataset -----------------------------------------------------------------------------------

def generate_world(n_train: int, n_val: int, n_test: int, seed: int = 0, image_size: int = 32,
                   progress: bool = True):
    """A `datasets.DatasetDict` of rendered scenes in the "COCO dataset" format (docs/formats.md).

    Columns: ``cocoid`` (int64, unique over splits), ``image`` (PNG bytes), ``captions`` (5 sparse
    references), ``complete`` (the complete description), ``scene`` (JSON), ``split``.
    """
    import datasets
    from tqdm.auto import tqdm

    features = datasets.Features({
        "cocoid": datasets.Value("int64"), "image": datasets.Image(),
        "captions": datasets.List(datasets.Value("string")), "complete": datasets.Value("string"),
        "scene": datasets.Value("string"), "split": datasets.Value("string"),
    })
    rng = np.random.default_rng([seed, 2024])
    splits = {}
    total = n_train + n_val + n_test
    bar = tqdm(total=total, desc="world: rendering scenes", unit="img", disable=not progress)
    next_id = 1
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = {k: [] for k in features}
        for _ in range(n):
            scene = sample_scene(rng)
            rows["cocoid"].append(next_id)
            rows["image"].append(render(scene, image_size))
            rows["captions"].append(sparse_references(scene, rng))
            rows["complete"].append(complete_description(scene))
            rows["scene"].append(scene.to_json())
            rows["split"].append(name)
            next_id += 1
            bar.update()
        splits[name] = datasets.Dataset.from_dict(rows, features=features, split=name)
    bar.close()
    return datasets.DatasetDict(splits)


def world_texts(dataset_dict) -> list[str]:
    """Every reference and complete description of the world (tokenizer training text)."""
    texts: list[str] = []
    for split in dataset_dict.values():
        for refs in split["captions"]:
            texts += refs
        texts += split["complete"]
    return texts


def train_tokenizer(texts: list[str], out_dir: str | Path | None = None, vocab_size: int = 2000,
                    model_max_length: int = 64):
    """A GPT-2-style byte-level BPE tokenizer trained on the world's text (eos = pad = bos = id 0).

    With the world's small vocabulary every word becomes one token, so a caption of
    ``CAPTION_TOKENS`` tokens is about ``CAPTION_TOKENS - 1`` words and a full stop. Words are
    always preceded by a space (``add_prefix_space``): there is no separate sentence-initial
    form of a word, which a policy could otherwise glue to the previous word ("greya").
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    eos = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer(add_prefix_space=True)  # every word is "Ġword", also at the start
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=[eos],
                            show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eos, eos_token=eos, unk_token=eos,
                                  pad_token=eos, model_max_length=model_max_length)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


TWIN_KINDS = ("shape", "colour", "size", "cell", "background", "binding")


def twin_kinds(scene: Scene) -> list[str]:
    """The kinds of minimal pair :func:`twin` can make of ``scene``: "cell" needs a free cell and
    "binding" two objects that differ in both colour and shape."""
    objs = scene.objects
    kinds = [k for k in TWIN_KINDS if k not in ("cell", "binding")]
    if len(objs) < len(CELLS):
        kinds.append("cell")
    if any(a.colour != b.colour and a.shape != b.shape for i, a in enumerate(objs) for b in objs[i + 1:]):
        kinds.append("binding")
    return kinds


def twin(scene: Scene, rng: np.random.Generator, weights: dict[str, float] | None = None,
         kind: str | None = None) -> Scene:
    """The same scene with exactly one thing changed: an object's shape, colour, size or cell, the
    background, or the binding of colours to shapes (two objects of different colours and shapes
    swap their colours: the same colours and shapes, bound the other way round). A minimal pair for
    measuring (and teaching) fine-grained discrimination. ``weights``: relative frequency of each
    kind (default: uniform over the kinds the scene allows); ``kind``: force one (it must be
    allowed, see :func:`twin_kinds`)."""
    objs = list(scene.objects)
    allowed = twin_kinds(scene)
    if kind is None:
        w = np.array([(weights or {}).get(k, 1.0) for k in allowed], dtype=float)
        kind = allowed[rng.choice(len(allowed), p=w / w.sum())]
    elif kind not in allowed:
        raise ValueError(f"a {kind!r} twin is impossible for this scene (allowed: {allowed})")
    if kind == "background":
        return Scene(rng.choice([b for b in BACKGROUNDS if b != scene.background]), scene.objects, scene.seed)
    if kind == "binding":
        pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
                 if objs[i].colour != objs[j].colour and objs[i].shape != objs[j].shape]
        i, j = pairs[int(rng.integers(len(pairs)))]
        a, b = objs[i], objs[j]
        objs[i], objs[j] = Obj(a.shape, b.colour, a.size, a.cell), Obj(b.shape, a.colour, b.size, b.cell)
        return Scene(scene.background, tuple(objs), scene.seed)
    j = int(rng.integers(len(objs)))
    o = objs[j]
    if kind == "shape":
        o = Obj(rng.choice([s for s in SHAPES if s != o.shape]), o.colour, o.size, o.cell)
    elif kind == "colour":
        o = Obj(o.shape, rng.choice([c for c in COLOURS if c != o.colour]), o.size, o.cell)
    elif kind == "size":
        o = Obj(o.shape, o.colour, "large" if o.size == "small" else "small", o.cell)
    else:
        free_cells = [c for c in range(len(CELLS)) if c not in {x.cell for x in objs}]
        o = Obj(o.shape, o.colour, o.size, int(rng.choice(free_cells)))
    objs[j] = o
    return Scene(scene.background, tuple(sorted(objs, key=lambda x: x.cell)), scene.seed)


def twin_kind(scene: Scene, other: Scene) -> str:
    """Which kind of change :func:`twin` made: "background", "cell", "binding", "shape", "colour"
    or "size"."""
    if scene.background != other.background:
        return "background"
    if [o.cell for o in scene.objects] != [o.cell for o in other.objects]:
        return "cell"
    changed = [(a, b) for a, b in zip(scene.objects, other.objects) if a != b]
    if len(changed) == 2:
        (a, b), (c, d) = changed
        if (b.colour, d.colour) == (c.colour, a.colour) and (a.shape, c.shape) == (b.shape, d.shape):
            return "binding"
    for a, b in changed:
        for kind in ("shape", "colour", "size"):
            if getattr(a, kind) != getattr(b, kind):
                return kind
    raise ValueError("the two scenes are identical")
