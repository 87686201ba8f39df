"""The whole NDLB method end to end on the offline synthetic world (``make demo``).

    python -m demo.run --out demo_out            # make demo: one seed, the headline rows (~15 min, 2 cores)
    python -m demo.run --out demo_fast --fast    # the small variant the test suite runs
    python -m demo.select --out demo_out         # the choices, on the validation bags only
    python -m demo.study --out demo_out --seeds 0 1 2   # every row over seeds, with confidence intervals

Stages (each with its own progress bar; a finished stage is skipped when the command is rerun with
the same ``--out``, unless a setting it depends on changed: each stage's marker holds a fingerprint
of its settings, so an interrupted run resumes where it stopped and a changed setting redoes exactly
the stages it touches):

1. ``world`` — render the scenes, their sparse references and complete descriptions
   (:mod:`demo.world`), save them as a dataset in the "COCO dataset" format (docs/formats.md) and
   train the world's BPE tokenizer. Train / val / test splits: val is for every choice, test for the final table.
2. ``judge_a`` / ``judge_b`` — train the two CLIP judges from scratch (:mod:`demo.judges`):
   A (transformers) gives the SR reward and initialises the captioner's vision tower; B
   (open_clip, another architecture, seed and data order) scores every reported R@1. Their
   minimal-pair accuracy per kind is measured on val pairs and on held-out test pairs.
3. ``mle`` / ``mle_complete`` — MLE pre-training with ``train_mle.py`` (NDLB Sec. 4.1-4.2) on the
   sparse references (the COCO analogue) and on the complete descriptions (the HolisticCap
   analogue of Visual Caption Boost, Sec. 3.2). GPT-2 is trained from scratch; the vision tower is
   judge A's, frozen.
4. ``mining`` — TrueMatch (Alg. 1 + 2, Sec. 3.1) on the test split and on the val split, and
   training bags (App. B.2) on the train split, with ``datasets_scripts.truematch``. The test and
   val bags are mined with the evaluation judge B and the training bags with the reward judge A:
   the benchmark (which images are confusable, and who decides retrieval) is then entirely
   independent of what the captioner was trained with, while the training side uses one CLIP for
   bags and reward as the paper does. As the stand-in for the paper's manual filtering (Sec. 3.1),
   candidate bags whose scenes have the same complete description (indistinguishable by any
   caption), or that a complete description cannot solve, are dropped.
5. ``sr_*`` — self-retrieval REINFORCE fine-tuning with ``train_sr.py`` (Sec. 4.1, 4.5-4.8), reward
   SR + 0.5 CIDEr-D: from each MLE, random in-batch distractors (DiscriTune) and training bags with
   the bag-size curriculum 3 -> 5 -> 7 (BagCurri, App. B.3); the headline row
   ``sr_bags_curri_from_complete`` is NDLB (complete-description MLE -> SR + BagCurri + 0.5 CIDEr,
   Sec. 4.8). The study adds SR-LV / full fine-tuning in the other mode, fixed bags of 3 / 5 / 7
   (Table 10) and lambda 0 (Table 13). Each run keeps its checkpoint with the best R@1 on the val
   bags of 3 (judge B).
6. ``val_*`` / ``eval_*`` — caption the val / test split (greedy, the caption length limit) and
   score it with the project's evaluate modules (``metrics/truematch``, ``metrics/self_retrieval``,
   ``metrics/cider_d``), ``evaluation.vocabulary_stats`` and the world's ground truth
   (attribute precision, hallucinated details); R@1 once per judge on test. Per-bag hits go to
   ``hits/`` for the study's paired bootstrap.
7. ``report`` — ``results.json`` and ``report.html`` (:mod:`demo.report`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from common import staged_dir, write_json
from demo.scheduler import Stage, fingerprint, run_parallel
from demo.world import CAPTION_TOKENS
from evaluation import load_metric, vocabulary_stats

__all__ = ["DemoConfig", "FAST", "FULL", "POSITIONAL_JUDGES", "SRRun", "config_for", "main", "run_demo"]


@dataclass(frozen=True)
class SRRun:
    """One SR fine-tuning run of the demo.

    ``init``: the MLE model it starts from (``"mle"``: sparse references, the COCO analogue;
    ``"mle_complete"``: complete descriptions, the HolisticCap analogue). ``bags``: ``"curri"`` =
    training bags with BagCurri (bag size 3 -> 5 -> 7 over the epochs, App. B.3), ``"random"`` =
    random in-batch distractors (DiscriTune), or a fixed size such as ``"5"`` (Table 10's BagN).
    ``lora_modules``: ``"LV"`` (SR-LV, the paper's mode), ``"L"`` (SR-L), ``"V"`` or ``"none"``
    (full fine-tuning). ``learning_rate``: ``None`` = ``DemoConfig.sr_lr`` (full fine-tuning) or
    ``DemoConfig.sr_lora_lr`` (LoRA). ``cider_weight`` (lambda of Table 13) and ``caption_tokens``:
    ``None`` = the ``DemoConfig`` value.
    """

    name: str
    lora_modules: str = "none"
    bags: str = "curri"
    init: str = "mle"
    learning_rate: float | None = None
    cider_weight: float | None = None
    caption_tokens: int | None = None


# The SR mode of the headline rows (full fine-tuning or SR-LV), chosen on the validation bags
# (python -m demo.select; README, "The offline demo"); OTHER_MODE is run in the study as well.
# Seed 0, validation bags (demo.select, README): SR-LV at lr 1e-5 scored 68.1 mean val TrueMatch R@1
# vs full fine-tuning's best 66.6 (lr 3e-5), and the 16-token limit gave SR its largest gain over the MLE.
SR_MODE = "LV"
OTHER_MODE = "none"


def _mode_suffix(mode: str) -> str:
    return "" if mode == SR_MODE else ("_full" if mode == "none" else f"_{mode}")


def paper_runs(mode: str = SR_MODE) -> tuple[SRRun, ...]:
    """From each MLE: SR with random distractors and SR + BagCurri (NDLB Sec. 4.6), in ``mode``."""
    x = _mode_suffix(mode)
    return (SRRun(f"sr_bags_curri{x}_from_complete", mode, "curri", "mle_complete"),
            SRRun(f"sr_random{x}_from_complete", mode, "random", "mle_complete"),
            SRRun(f"sr_bags_curri{x}", mode, "curri", "mle"),
            SRRun(f"sr_random{x}", mode, "random", "mle"))


HEADLINE = "sr_bags_curri_from_complete"  # NDLB: complete-description MLE -> SR + BagCurri + 0.5 CIDEr
# ``make demo``: the headline, its SR-random control and SR + BagCurri from the sparse-reference MLE
DEFAULT_RUNS = paper_runs()[:3]
# ``python -m demo.study``: every row of NDLB's experiments (Sec. 4.6, Tables 10 and 13 analogues)
STUDY_RUNS = (
    *paper_runs(), *paper_runs(OTHER_MODE),
    *(SRRun(f"sr_bag{s}_from_complete", SR_MODE, str(s), "mle_complete") for s in (3, 5, 7)),  # Table 10
    SRRun("sr_bags_curri_from_complete_lambda0", SR_MODE, "curri", "mle_complete", cider_weight=0.0),  # Table 13
)


@dataclass
class DemoConfig:
    """Every size and hyper-parameter of a demo run (saved as ``demo_config.json``)."""

    seed: int = 0
    image_size: int = 32
    n_train: int = 5000
    n_val: int = 1000  # selection (learning rates, checkpoints, length limit) uses val bags only
    n_test: int = 2000
    caption_tokens: int = CAPTION_TOKENS  # max_new_tokens: the caption length limit (demo.world)
    # judges (demo.judges.JudgeSpec fields). 8 px patches: 2 x 2 patches per cell of the scene.
    judge_a: dict[str, Any] = field(default_factory=lambda: dict(
        width=128, layers=3, heads=4, patch_size=8, text_width=64, text_layers=2, embed_dim=64,
        steps=800, batch_size=128, lr=2e-3, twin_fraction=0.5))
    judge_b: dict[str, Any] = field(default_factory=lambda: dict(
        width=64, layers=4, heads=2, patch_size=8, text_width=64, text_layers=2, embed_dim=64,
        steps=800, batch_size=128, lr=2e-3, twin_fraction=0.5))
    # minimal pairs in the judges' batches (demo.world.twin): the hardest kinds get the largest share
    judge_twin_weights: dict[str, float] = field(default_factory=lambda: dict(
        shape=4.0, cell=2.0, colour=1.0, size=1.0, background=0.5, binding=1.0))
    # captioner
    gpt2: dict[str, Any] = field(default_factory=lambda: dict(n_layer=3, n_embd=128, n_head=4, n_positions=64))
    prefix_length: int = 4
    mle_steps: int = 1000
    mle_complete_steps: int = 500  # 0 = skip the MLE on complete descriptions
    mle_lr: float = 1e-3
    mle_batch: int = 64
    # mining
    bag_sizes: tuple[int, ...] = (3, 5, 7)
    top_k: int = 200
    # SR (Sec. 4.1, 4.5-4.8): reward SR + lambda CIDEr-D, lambda = 0.5 (Sec. 4.8, Table 13). CIDEr's
    # references are those the initial MLE was trained on (sparse references or the complete
    # description, as the paper rewards HolisticCap captions' CIDEr after HolisticCap MLE).
    sr_runs: tuple[SRRun, ...] = DEFAULT_RUNS
    sr_epochs: int = 6
    sr_batch: int = 64
    sr_lr: float = 3e-5  # full fine-tuning; best of 3e-5 / 1e-4 / 3e-4 on the val bags (demo.select)
    sr_lora_lr: float = 1e-5  # SR-LV; best of 1e-5 / 3e-5 / 1e-4 on the val bags (demo.select)
    sr_cider_weight: float = 0.5
    sr_temperature: float = 0.7  # sampling temperature
    sr_reward_scale: str = "judge"  # Eq. 1 multiplier of the cosines: "judge" = judge A's logit scale, or a number
    sr_lora_rank: int = 16
    sr_lora_alpha: int = 32
    # periodic evaluation on the val bags of 3 (judge B) every N steps, and the checkpoint with the
    # best val R@1 kept (0 = neither: the last step is kept)
    sr_eval_every: int = 80
    # evaluation
    num_distractors: int = 99
    examples: int = 6
    test_eval: bool = True  # False: validation only (demo.select: test bags are not read)
    select_runs: tuple[SRRun, ...] = ()  # SR candidates scored on val only (demo.select)
    val_limits: tuple[int, ...] = ()  # extra caption length limits for the MLEs' val scores (demo.select)

    def bag_schedule(self, bags: str) -> str | None:
        """``--bag_schedule`` of a run: BagCurri spreads the bag sizes evenly over the epochs."""
        if bags == "random":
            return None
        if bags == "curri":
            per = max(1, self.sr_epochs // len(self.bag_sizes))
            sizes = [s for s in self.bag_sizes for _ in range(per)]
            return ",".join(map(str, (sizes + [self.bag_sizes[-1]] * self.sr_epochs)[: max(self.sr_epochs, len(sizes))]))
        return bags

    def bag_files_needed(self, bags: str) -> list[int]:
        """The training bag sizes a run reads."""
        schedule = self.bag_schedule(bags)
        return sorted({int(s) for s in schedule.split(",")}) if schedule else []

    def mles(self) -> list[str]:
        return ["mle", "mle_complete"] if self.mle_complete_steps else ["mle"]


FULL = DemoConfig()
FAST = DemoConfig(
    n_train=2000, n_val=200, n_test=800,
    judge_a=dict(FULL.judge_a, steps=300), judge_b=dict(FULL.judge_b, steps=300),
    mle_steps=400, mle_complete_steps=0, caption_tokens=14,
    # a pipeline check with an effect that is robust in 4 minutes (tests/test_demo.py): full
    # fine-tuning at 1e-4 moves the short run far more than the SR-LV choice of the full demo
    sr_runs=(SRRun("sr_bags_curri", "none", "curri", "mle"),), sr_lr=1e-4,
    top_k=100, sr_eval_every=48, num_distractors=49, examples=3,
)


# Judges that see positions and bindings (issue 20, item 5; opt-in: ``--judges positional``). Both
# judges are position-blind under the defaults (minimal pairs that move one object: 0.50-0.51, chance;
# their image embeddings of such a pair have cosine 0.995-0.997). Two changes are needed together
# (either alone leaves cells at 0.51-0.52 on val pairs, fast world): the vision tower's position
# embeddings start as strong as the patch content (demo.judges.init_position_embeddings) and a
# larger share of every batch is minimal pairs, most of them moving one object or swapping colours.
# Chosen on val pairs of the full world, seed 0, judge B (all kinds: 0.967 with shape weight 12 vs
# 0.946 with 4, where shapes fell to 0.77); test pairs over seeds 0 / 1 / 2: cell 0.94 / 0.99 / 0.95,
# binding 0.92 / 0.89 / 0.90 (README, "Judges that see positions"). ``sr``: the SR choices that
# ``python -m demo.select --judges positional`` made for these judges on the val bags (seed 0):
# SR-LV stays the better mode, its learning rate moves from 1e-5 to 1e-4, the limit stays 16.
# Opt-in, not the default: over 3 seeds SR does not gain over its init with these judges (README).
POSITIONAL_JUDGES: dict[str, Any] = dict(
    spec=dict(twin_fraction=0.75, position_init_std=0.5),
    twin_weights=dict(shape=12.0, cell=20.0, colour=1.0, size=1.0, background=0.5, binding=4.0),
    sr=dict(sr_lora_lr=1e-4),
)
JUDGE_RECIPES = ("default", "positional")


def config_for(fast: bool, seed: int, study: bool = False, judges: str = "default") -> DemoConfig:
    """The settings of ``make demo`` (``fast``: the test suite's; ``study``: every row of the study,
    :data:`STUDY_RUNS`, instead of the default rows :data:`DEFAULT_RUNS`; ``judges="positional"``:
    the judge recipe :data:`POSITIONAL_JUDGES`)."""
    if judges not in JUDGE_RECIPES:
        raise ValueError(f"unknown judge recipe {judges!r}; choose one of {JUDGE_RECIPES}")
    cfg = replace(FAST if fast else FULL, seed=seed)
    if study and not fast:
        cfg = replace(cfg, sr_runs=STUDY_RUNS)
    if judges == "positional":
        cfg = replace(cfg, judge_a=dict(cfg.judge_a, **POSITIONAL_JUDGES["spec"]),
                      judge_b=dict(cfg.judge_b, **POSITIONAL_JUDGES["spec"]),
                      judge_twin_weights=dict(POSITIONAL_JUDGES["twin_weights"]), **POSITIONAL_JUDGES["sr"])
    return cfg


def _config_json(cfg: DemoConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_stdout():
    """Hide the chatty stdout of the training scripts (tqdm bars go to stderr and stay)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


class Paths:
    def __init__(self, out: Path):
        self.out = out
        self.world = out / "world"
        self.tokenizer = out / "tokenizer"
        self.judge_a = out / "judges" / "reward_judge_A"
        self.judge_b = out / "judges" / "eval_judge_B"
        self.gpt2_init = out / "models" / "gpt2_init"
        self.truematch = out / "truematch"
        self.val_truematch = out / "val_truematch"
        self.hits = out / "hits"
        self.val = out / "val"
        self.bags = out / "bags"
        self.captions = out / "captions"
        self.logs = out / "logs"
        self.stages = out / "stages"
        self.cache = out / "cache"

    def model(self, name: str) -> Path:
        return self.out / "models" / name


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------

def stage_world(cfg: DemoConfig, p: Paths) -> dict[str, Any]:
    from demo.world import generate_world, train_tokenizer, world_texts

    world = generate_world(cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.seed, image_size=cfg.image_size)
    with staged_dir(p.world) as tmp:
        world.save_to_disk(str(tmp))
    with staged_dir(p.tokenizer) as tmp:
        tokenizer = train_tokenizer(world_texts({"train": world["train"]}), tmp)
    lengths = [len(tokenizer(t)["input_ids"]) for t in world["train"]["complete"][:500]]
    ref_lengths = [len(tokenizer(r)["input_ids"]) for refs in world["train"]["captions"][:500] for r in refs]
    return {"vocab_size": len(tokenizer), "complete_tokens_mean": sum(lengths) / len(lengths),
            "complete_tokens_max": max(lengths), "reference_tokens_mean": sum(ref_lengths) / len(ref_lengths),
            "splits": {k: len(v) for k, v in world.items()}}


def _world(p: Paths):
    from datasets import load_from_disk

    return load_from_disk(str(p.world))


def _twins(split, seed: int, image_size: int, weights: dict[str, float] | None = None):
    """Minimal pairs of the images of ``split``, regenerated deterministically from the scenes."""
    import numpy as np

    from demo.world import Scene, complete_description, render, twin, twin_kind

    rng = np.random.default_rng([seed, 99])
    originals = [Scene.from_json(s) for s in split["scene"]]
    scenes = [twin(s, rng, weights) for s in originals]
    return ([render(s, image_size) for s in scenes], [complete_description(s) for s in scenes],
            [twin_kind(a, b) for a, b in zip(originals, scenes)])


def pair_sets(split, seed: int, image_size: int) -> dict[str, tuple[list[int], list, list[str]]]:
    """For every image of ``split`` and every kind of minimal pair its scene allows
    (:func:`demo.world.twin_kinds`), one twin: ``{kind: (rows, twin images, twin descriptions)}``."""
    import numpy as np

    from demo.world import TWIN_KINDS, Scene, complete_description, render, twin, twin_kinds

    rng = np.random.default_rng([seed, 98])
    out: dict[str, tuple[list[int], list, list[str]]] = {k: ([], [], []) for k in TWIN_KINDS}
    for r, text in enumerate(split["scene"]):
        scene = Scene.from_json(text)
        for kind in twin_kinds(scene):
            other = twin(scene, rng, kind=kind)
            rows, images, texts = out[kind]
            rows.append(r)
            images.append(render(other, image_size))
            texts.append(complete_description(other))
    return out


def stage_judge(which: str, cfg: DemoConfig, p: Paths) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from demo.judges import (JudgeSpec, build_judge_a, build_judge_b, judge_quality, pair_accuracy, pixel_tensor,
                             save_judge_b, train_judge)
    from metrics.clip_judge import ClipJudge

    world = _world(p)
    train, val, test = world["train"], world["val"], world["test"]
    spec = JudgeSpec(**(cfg.judge_a if which == "A" else cfg.judge_b), seed=cfg.seed * 100 + (1 if which == "A" else 2))
    pixels = pixel_tensor(train["image"], cfg.image_size)
    twin_images, twin_texts, _ = _twins(train, spec.seed, cfg.image_size, cfg.judge_twin_weights)
    twin_pixels = pixel_tensor(twin_images, cfg.image_size)
    target = p.judge_a if which == "A" else p.judge_b
    with staged_dir(target) as tmp:
        if which == "A":
            tokenizer = AutoTokenizer.from_pretrained(str(p.tokenizer))
            model, processor = build_judge_a(tokenizer, spec, cfg.image_size)
            judge = ClipJudge.from_transformers(model, tokenizer, processor, name="A", device="cpu")
        else:
            model, preprocess, tokenizer, model_cfg = build_judge_b(spec, cfg.image_size)
            judge = ClipJudge.from_open_clip(model, preprocess, tokenizer, name="B", device="cpu")
        model.requires_grad_(True)  # ClipJudge freezes its model; train it, then freeze again
        log = train_judge(model, judge.tokenize, pixels, train["captions"], train["complete"], spec,
                          twin_pixels=twin_pixels, twin_complete=twin_texts,
                          progress_desc=f"judge {which}: contrastive training")
        model.requires_grad_(False)
        if which == "A":
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            processor.save_pretrained(str(tmp))
        else:
            save_judge_b(model, model_cfg, tmp, cfg.image_size)
    # quality on held-out images, through the saved folder as any user would load it
    loaded = ClipJudge.from_pretrained(str(target), device="cpu")
    quality = judge_quality(loaded, val["image"], val["captions"], val["complete"], pool=min(100, len(val)))
    # minimal-pair accuracy per kind: on val pairs (what recipes are compared on) and on held-out
    # test pairs (what is reported)
    pairs = {split_name: pair_accuracy(loaded, split["image"], split["complete"],
                                       pair_sets(split, spec.seed + 1, cfg.image_size))
             for split_name, split in (("val", val), ("test", test))}
    n_params = sum(t.numel() for t in model.parameters())
    write_json(p.logs / f"judge_{which}_log.json", log)
    torch.set_grad_enabled(True)
    return {"params": n_params, "spec": _config_json(spec), "quality": quality, "pairs": pairs, "final": log[-1],
            "backend": loaded.backend}


def stage_gpt2_init(cfg: DemoConfig, p: Paths) -> dict[str, Any]:
    """A randomly initialised small GPT-2 over the world's tokenizer (trained from scratch by MLE)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(p.tokenizer))
    eos = tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                                       pad_token_id=eos, **cfg.gpt2))
    with staged_dir(p.gpt2_init) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return {"params": sum(t.numel() for t in model.parameters())}


def set_generation_defaults(folder: Path, max_new_tokens: int) -> None:
    """Make greedy decoding within the caption length limit the saved model's default, so that
    ``inference.py`` reproduces the demo's captions."""
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(str(folder))
    generation.num_beams = 1
    generation.max_new_tokens = max_new_tokens
    generation.save_pretrained(str(folder))


def _move_trainer_state(folder: Path, name: str, p: Paths) -> None:
    """Keep a run's trainer_state.json (training curves) under logs/ and drop checkpoint folders."""
    states = sorted(folder.glob("checkpoint-*/trainer_state.json")) + [folder / "trainer_state.json"]
    for state in states:
        if state.is_file():
            p.logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(state, p.logs / f"{name}_trainer_state.json")
    for ckpt in folder.glob("checkpoint-*"):
        shutil.rmtree(ckpt)


def stage_mle(name: str, column: str, steps: int, cfg: DemoConfig, p: Paths) -> dict[str, Any]:
    import train_mle

    target = p.model(name)
    with staged_dir(target) as tmp:
        argv = ["--dataset", str(p.world), "--caption_column", column, "--clip", str(p.judge_a),
                "--gpt2", str(p.gpt2_init), "--prefix_length", str(cfg.prefix_length), "--output_dir", str(tmp),
                "--max_steps", str(steps), "--learning_rate", str(cfg.mle_lr), "--lr_scheduler_type", "cosine",
                "--warmup_steps", str(max(1, steps // 20)), "--per_device_train_batch_size", str(cfg.mle_batch),
                "--weight_decay", "0.01", "--logging_steps", "20", "--save_strategy", "steps", "--save_steps", str(steps),
                "--save_only_model", "--report_to", "none", "--use_cpu", "--seed", str(cfg.seed),
                "--dataloader_num_workers", "0"]
        with _quiet_stdout():
            metrics = train_mle.main(argv)
        _move_trainer_state(tmp, name, p)
        set_generation_defaults(tmp, cfg.caption_tokens)
    return {"argv": ["train_mle.py", *argv], "train_loss": metrics.get("train_loss")}


def solvable(bags, image_emb, text_emb) -> "torch.Tensor":
    """(T,) bool: the complete description of every image of the bag retrieves that image within
    the bag (R@1 = 1 for all members) — the bag can be solved by a fine-grained caption."""
    import torch

    bags = torch.as_tensor(bags)
    sim = torch.einsum("bsd,btd->bst", text_emb[bags], image_emb[bags])  # (T, s captions, s images)
    own = sim.diagonal(dim1=1, dim2=2)  # (T, s)
    others = sim.masked_fill(torch.eye(bags.shape[1], dtype=torch.bool), float("-inf")).amax(2)
    return (own > others).all(1)


def _mine_bags(dataset, judge, sizes, cache: Path, check_solvable: bool = True):
    """Alg. 1 (candidate bags), the stand-in for the paper's manual filtering, then Alg. 2.

    Manual filtering (Sec. 3.1) keeps bags "that would require captioning systems to capture some
    aspect of fine-grained visual discrimination". Here a candidate bag is kept when its scenes
    have different complete descriptions and (``check_solvable``) those complete descriptions
    retrieve their own images within the bag by the mining judge: a fine-grained caption can
    solve it. Impossible bags (e.g. scenes the judge cannot tell apart at all) are dropped.
    """
    import torch

    from datasets_scripts.truematch import bags_from_knn, curate, knn, multimodal_embeddings

    m = multimodal_embeddings(dataset, judge, cache_dir=cache, progress=True)
    sims, idx = knn(m, max(sizes) - 1, progress=True)
    complete = dataset["complete"]
    image_emb = m[:, : m.shape[1] // 2]  # the normalised image half of the multimodal embedding
    text_emb = judge.embed_texts(complete) if check_solvable else None
    curated, stats = {}, {}
    for s in sizes:
        bags, alpha = bags_from_knn(sims, idx, s)
        distinct = torch.tensor([len({complete[r] for r in bag.tolist()}) == s for bag in bags])
        keep = distinct.clone()
        stat = {"candidates": len(bags), "distinct": int(keep.sum())}
        if check_solvable:
            keep &= solvable(bags, image_emb, text_emb)
            stat["solvable"] = int(keep.sum())
        kept, pos = curate(bags[keep], alpha[keep], return_indices=True)
        curated[s] = (kept, alpha[keep][pos].tolist())
        stat["curated"] = len(kept)
        # the same curation without the solvability check, reported for transparency
        curated[f"unfiltered_{s}"] = (curate(bags[distinct], alpha[distinct]), None)
        stat["curated_unfiltered"] = len(curated[f"unfiltered_{s}"][0])
        stats[str(s)] = stat
    return curated, stats


def stage_mining(cfg: DemoConfig, p: Paths) -> dict[str, Any]:
    from datasets_scripts.truematch import knn, multimodal_embeddings, training_bags_from_knn, write_truematch
    from metrics.clip_judge import ClipJudge

    world = _world(p)
    judge_a = ClipJudge.from_pretrained(str(p.judge_a), device="cpu")
    judge_b = ClipJudge.from_pretrained(str(p.judge_b), device="cpu")
    sizes = list(cfg.bag_sizes)
    out: dict[str, Any] = {}

    # TrueMatch on the test split, mined by the evaluation judge B
    test = world["test"]
    curated, stats = _mine_bags(test, judge_b, sizes, p.cache / "mining")
    info = {"judge": str(p.judge_b.relative_to(p.out)), "dataset": "world", "split": "test", "n_images": len(test),
            "sizes": sizes, "candidates": {k: v["candidates"] for k, v in stats.items()},
            "curated": {k: v["curated"] for k, v in stats.items()}, "min_alpha": None, "max_bags": None,
            "review": None, "filter": "stand-in for the manual filtering: candidate bags whose scenes have "
                                      "identical complete descriptions, or whose complete descriptions do not "
                                      "retrieve their own images within the bag (judge B), are dropped before Alg. 2"}
    with staged_dir(p.truematch) as tmp:
        with _quiet_stdout():
            write_truematch(tmp, test, {s: curated[s] for s in sizes}, info, progress=False)
        ids = test["cocoid"]
        for s in sizes:  # the curated bags without the solvability filter, scored too (transparency)
            write_json(tmp / f"unfiltered_{s}.json", [[int(ids[r]) for r in b] for b in curated[f"unfiltered_{s}"][0]])
    out["truematch"] = stats
    out["truematch_attribute_differences"] = {str(s): _mean_differences(test, curated[s][0]) for s in sizes}

    # the same benchmark on the val split (judge B, the same filter): every choice of the demo (learning
    # rates, checkpoints, caption length limit) is made on these bags, never on the test bags
    val = world["val"]
    val_curated, val_stats = _mine_bags(val, judge_b, sizes, p.cache / "mining")
    with staged_dir(p.val_truematch) as tmp:
        with _quiet_stdout():
            write_truematch(tmp, val, {s: val_curated[s] for s in sizes}, {**info, "split": "val", "n_images": len(val),
                            "candidates": {k: v["candidates"] for k, v in val_stats.items()},
                            "curated": {k: v["curated"] for k, v in val_stats.items()}}, progress=False)
    val_ids = val["cocoid"]  # bags of 3 for the SR trainer's periodic evaluation (its bag-file format)
    write_json(p.bags / "val_bags_3.json", {"bag_size": 3, "split": "val", "judge": "eval_judge_B",
                                            "cocoids": [[int(val_ids[r]) for r in b] for b in val_curated[3][0]]})
    out["val_truematch"] = val_stats

    # training bags on the train split, mined by the reward judge A (App. B.2)
    train = world["train"]
    m = multimodal_embeddings(train, judge_a, cache_dir=p.cache / "mining", progress=True)
    _, idx = knn(m, min(cfg.top_k, len(train) - 1), progress=True)
    ids = train["cocoid"]
    out["training_bags"] = {}
    for s in sizes:
        bags, bag_stats = training_bags_from_knn(idx, s, seed=cfg.seed, return_stats=True)
        write_json(p.bags / f"train_bags_{s}.json", {"bag_size": s, "cocoids": [[int(ids[r]) for r in b] for b in bags],
                                                     "split": "train", "judge": "reward_judge_A", **bag_stats})
        out["training_bags"][str(s)] = {**bag_stats, "mean_attribute_differences":
                                        _mean_differences(train, bags[: bag_stats["n_hard_bags"]][:300])}
    return out


def _mean_differences(split, bags) -> float:
    """Mean number of attributes (of the complete description) by which bag-mates differ from the
    bag's first image: how fine-grained the bags are, by the world's ground truth."""
    from demo.world import Scene, scene_attributes

    scenes = split["scene"]
    diffs = []
    for bag in bags:
        first = scene_attributes(Scene.from_json(scenes[bag[0]]))
        for r in bag[1:]:
            diffs.append(len(first ^ scene_attributes(Scene.from_json(scenes[r]))) / 2)
    return sum(diffs) / max(1, len(diffs))


def run_settings(run: SRRun, cfg: DemoConfig) -> dict[str, Any]:
    """The resolved settings of one SR run (defaults of ``cfg`` filled in)."""
    lr = run.learning_rate if run.learning_rate is not None else (
        cfg.sr_lr if run.lora_modules == "none" else cfg.sr_lora_lr)
    return {"learning_rate": lr,
            "cider_weight": cfg.sr_cider_weight if run.cider_weight is None else run.cider_weight,
            "caption_tokens": run.caption_tokens or cfg.caption_tokens,
            "bag_schedule": cfg.bag_schedule(run.bags),
            "references_column": "complete" if run.init == "mle_complete" else "captions"}


def stage_sr(run: SRRun, cfg: DemoConfig, p: Paths) -> dict[str, Any]:
    """SR fine-tuning with train_sr.py (every setting explicit: the script's defaults are the paper's
    COCO recipe). Eq. 1 scales the cosines by the judge's own learned logit scale (``--sr_scale
    judge``, as the authors' code does with OpenAI CLIP's 100): judge A's is ~25; with raw cosines
    the softmax over a batch of 64 images would be almost uniform and a bag's hard negatives would
    weigh no more than random images. LoRA adapters start as the authors' (``lora_A ~ N(0, 1)``,
    ``lora_B = 0``). With ``cfg.sr_eval_every`` the run is evaluated on the val bags of 3 by judge B
    every that many steps and the checkpoint with the best val R@1 is the result (the choice of
    epochs and checkpoint, made on validation only)."""
    import train_sr

    settings = run_settings(run, cfg)
    target = p.model(run.name)
    with staged_dir(target) as tmp:
        rewards, weights = ["sr"], ["1.0"]
        if settings["cider_weight"]:
            rewards, weights = ["sr", "cider"], ["1.0", str(settings["cider_weight"])]
        argv = ["--model", str(p.model(run.init)), "--dataset", str(p.world), "--judge", str(p.judge_a),
                "--rewards", *rewards, "--reward_weights", *weights, "--references_column", settings["references_column"],
                "--sr_scale", str(cfg.sr_reward_scale), "--baseline", "mean", "--eval_num_beams", "1",
                "--output_dir", str(tmp),
                "--per_device_train_batch_size", str(cfg.sr_batch), "--num_train_epochs", str(cfg.sr_epochs),
                "--learning_rate", str(settings["learning_rate"]), "--lr_scheduler_type", "constant",
                "--warmup_steps", "0", "--temperature", str(cfg.sr_temperature),
                "--max_new_tokens", str(settings["caption_tokens"]), "--lora_modules", run.lora_modules,
                "--lora_rank", str(cfg.sr_lora_rank), "--lora_alpha", str(cfg.sr_lora_alpha),
                "--lora_init", "authors", "--max_grad_norm", "1.0", "--weight_decay", "0", "--logging_steps", "5",
                "--report_to", "none", "--use_cpu", "--seed", str(cfg.seed), "--dataloader_num_workers", "0"]
        schedule = settings["bag_schedule"]
        if schedule:
            sizes = sorted({int(x) for x in schedule.split(",")})
            argv += ["--bags", *[str(p.bags / f"train_bags_{s}.json") for s in sizes], "--bag_schedule", schedule]
        else:  # random in-batch distractors (train_sr.py's default is the authors' 20-epoch BagCurri)
            argv += ["--bag_schedule", "rand"]
        if cfg.sr_eval_every:
            every = str(cfg.sr_eval_every)
            argv += ["--eval_split", "val", "--eval_bags", str(p.bags / "val_bags_3.json"), "--eval_judge", str(p.judge_b),
                     "--eval_strategy", "steps", "--eval_steps", every, "--per_device_eval_batch_size", "256",
                     "--save_strategy", "steps", "--save_steps", every, "--save_only_model", "--save_total_limit", "2",
                     "--load_best_model_at_end", "--metric_for_best_model", "r1_bags", "--greater_is_better", "True"]
        else:
            argv += ["--save_strategy", "no"]
        with _quiet_stdout():
            metrics = train_sr.main(argv)
        best = _best_checkpoint(tmp)
        _move_trainer_state(tmp, run.name, p)
        set_generation_defaults(tmp, settings["caption_tokens"])
    return {"argv": ["train_sr.py", *argv], "train_runtime": metrics.get("train_runtime"), **settings, **best}


def _best_checkpoint(folder: Path) -> dict[str, Any]:
    """The step and val R@1 of the checkpoint the run kept (best val R@1 on the val bags of 3)."""
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return {}
    state = json.loads(state_file.read_text())
    evals = [h for h in state.get("log_history", []) if "eval_r1_bags" in h]
    if not evals:
        return {}
    checkpoint = state.get("best_model_checkpoint") or ""
    match = re.search(r"checkpoint-(\d+)$", checkpoint)
    return {"best_step": int(match.group(1)) if match else None, "best_val_r1_bags_3": state.get("best_metric"),
            "last_val_r1_bags_3": evals[-1]["eval_r1_bags"], "max_steps": state.get("max_steps"),
            "val_curve": [[h["step"], h["eval_r1_bags"]] for h in evals]}


def caption_split(model_dir: Path, split, max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy captions of every image of ``split`` within the caption length limit."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoProcessor

    from modeling_clipcap import ClipCapForCaptioning

    model = ClipCapForCaptioning.from_pretrained(str(model_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    captions: list[str] = []
    images = split["image"]
    for start in tqdm(range(0, len(split), batch_size), desc=f"captioning with {model_dir.name}", unit="batch"):
        pixel_values = processor(images=images[start : start + batch_size])["pixel_values"]
        with torch.no_grad():
            ids = model.generate(pixel_values=pixel_values, num_beams=1, do_sample=False,
                                 max_new_tokens=max_new_tokens)
        captions += processor.batch_decode(ids)
    return captions


def read_truematch_bags(folder: Path, sizes) -> list[list[str]]:
    """TrueMatch bags as lists of image ids, from the folder's ``{s}.json`` files (the authors'
    format that ``write_truematch`` writes next to the parquet configs)."""
    from datasets_scripts.truematch import read_authors_bags

    return [[str(c) for c in bag] for s in sizes for bag in read_authors_bags(folder / f"{s}.json")]


def score_captions(captions: list[str], split, bags: list[list[str]], judge, num_distractors: int | None,
                   seed: int, hits: dict[str, list[list[bool]]] | None = None) -> dict[str, float]:
    """One system's retrieval metrics on a split, by one judge: TrueMatch R@1 per bag size
    (``metrics/truematch``) and, unless ``num_distractors`` is None, R@1 against random distractors
    (``metrics/self_retrieval``). ``hits``: filled with each bag's per-caption hits by bag size."""
    ids = [str(i) for i in split["cocoid"]]
    images = split["image"]
    tm = load_metric("truematch").compute(predictions=captions, images=images, ids=ids, bags=bags, judge=judge,
                                      return_details=hits is not None)
    row = {k.replace("recall_at_1_bag_", "truematch_r1_"): 100.0 * v for k, v in tm.items()
           if k.startswith("recall_at_1_bag_")}
    if hits is not None:
        for bag in tm["per_bag"]:
            hits.setdefault(str(len(bag["bag"])), []).append(bag["correct"])
    if num_distractors is not None:
        rd = load_metric("self_retrieval").compute(predictions=captions, images=images, ids=ids,
                                               num_distractors=num_distractors, seed=seed, judge=judge)
        row["random_r1"] = 100.0 * rd["recall_at_1"]
        row["clipsc"] = rd["clipsc"]
    return row


def text_metrics(captions: list[str], split) -> dict[str, float]:
    """CIDEr-D and BLEU-4 against the sparse references (``metrics/cider_d``), the vocabulary
    (``evaluation.vocabulary_stats``) and attribute faithfulness (the world's ground truth)."""
    cider = load_metric("cider_d").compute(predictions=captions, references=[list(r) for r in split["captions"]])
    vocab = vocabulary_stats(captions)
    return {"cider": cider["cider"], "bleu_4": cider["bleu_4"], "vocab": vocab["vocab_size"],
            "words_ge5": vocab["words_ge5"], "mean_length": vocab["mean_length"],
            **faithfulness(captions, split["scene"])}


REFERENCE_SYSTEMS = ("reference_sparse", "reference_complete")


def _captions_of(name: str, split, max_new_tokens: int, p: Paths) -> list[str]:
    if name == "reference_sparse":  # a human-like sparse reference, as a reference point
        return [refs[0] for refs in split["captions"]]
    if name == "reference_complete":  # the complete description (not limited in length)
        return list(split["complete"])
    return caption_split(p.model(name), split, max_new_tokens)


def stage_eval(name: str, cfg: DemoConfig, p: Paths, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Caption the test split with one model (or take a reference caption) and score it: R@1 by
    the evaluation judge B (plain keys) and by the reward judge A (``_reward_judge`` keys). The
    per-bag hits by judge B go to ``hits/<name>.json`` (the study's paired bootstrap)."""
    from metrics.clip_judge import ClipJudge

    test = _world(p)["test"]
    ids = [str(i) for i in test["cocoid"]]
    captions = _captions_of(name, test, max_new_tokens or cfg.caption_tokens, p)
    write_json(p.captions / f"{name}.json", dict(zip(ids, captions)))
    bags = read_truematch_bags(p.truematch, cfg.bag_sizes)
    row: dict[str, Any] = {}
    hits: dict[str, list[list[bool]]] = {}
    for suffix, folder in (("", p.judge_b), ("_reward_judge", p.judge_a)):
        judge = ClipJudge.from_pretrained(str(folder), device="cpu", cache_dir=str(p.cache / "eval"))
        row.update({k + suffix: v for k, v in score_captions(captions, test, bags, judge, cfg.num_distractors,
                                                             cfg.seed, hits=None if suffix else hits).items()})
        if not suffix:  # judge B on the curated bags without the solvability filter
            unfiltered = [[str(c) for c in bag] for s in cfg.bag_sizes
                          for bag in json.loads((p.truematch / f"unfiltered_{s}.json").read_text())]
            tm = load_metric("truematch").compute(predictions=captions, images=test["image"], ids=ids, bags=unfiltered,
                                              judge=judge)
            row.update({f"truematch_unfiltered_r1_{s}": 100.0 * tm[f"recall_at_1_bag_{s}"] for s in cfg.bag_sizes})
    row.update(text_metrics(captions, test))
    write_json(p.hits / f"{name}.json", hits)
    return {"metrics": row}


def stage_val(name: str, cfg: DemoConfig, p: Paths, max_new_tokens: int) -> dict[str, Any]:
    """Caption the val split and score it on the val bags (judge B): ``val_truematch_r1_<s>``, the
    numbers every choice of the demo is made on, and CIDEr-D / faithfulness on val."""
    from metrics.clip_judge import ClipJudge

    val = _world(p)["val"]
    captions = _captions_of(name, val, max_new_tokens, p)
    write_json(p.val / f"captions_{name}@{max_new_tokens}.json", dict(zip([str(i) for i in val["cocoid"]], captions)))
    judge = ClipJudge.from_pretrained(str(p.judge_b), device="cpu", cache_dir=str(p.cache / "eval"))
    row = score_captions(captions, val, read_truematch_bags(p.val_truematch, cfg.bag_sizes), judge, None, cfg.seed)
    text = text_metrics(captions, val)
    row.update({k: text[k] for k in ("cider", "attribute_precision", "hallucinations_per_caption",
                                     "attributes_per_caption", "mean_length")})
    return {"metrics": {f"val_{k}": v for k, v in row.items()}, "caption_tokens": max_new_tokens}


def faithfulness(captions: list[str], scenes: list[str]) -> dict[str, float]:
    """Attribute precision (share of mentioned attributes that exist in the scene), hallucinated
    details per caption (mentioned attributes the scene does not have) and attributes mentioned per
    caption, by the world's ground truth."""
    per_caption = caption_faithfulness(captions, scenes)
    mentioned = sum(m for m, _ in per_caption)
    correct = sum(c for _, c in per_caption)
    n = max(1, len(captions))
    return {"attribute_precision": correct / max(1, mentioned), "hallucinations_per_caption": (mentioned - correct) / n,
            "attributes_per_caption": mentioned / n}


def caption_faithfulness(captions: list[str], scenes: list[str]) -> list[tuple[int, int]]:
    """(attributes mentioned, of which true) for each caption."""
    from demo.world import Scene, mentioned_attributes, scene_attributes

    out = []
    for caption, scene in zip(captions, scenes):
        said = mentioned_attributes(caption)
        out.append((len(said), len(said & scene_attributes(Scene.from_json(scene)))))
    return out


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def stage_graph(cfg: DemoConfig, p: Paths) -> list[Stage]:
    """Every stage with the stages it needs, in the order a single worker runs them (long ones
    first). Each stage's fingerprint covers the settings it uses and its dependencies'
    fingerprints: a rerun with other settings redoes exactly the stages whose inputs changed."""
    stages: list[Stage] = []
    prints: dict[str, str] = {}

    def add(name: str, deps: tuple[str, ...], params: Any, run: Callable[[], dict[str, Any]]) -> None:
        prints[name] = fingerprint([name, params], [prints[d] for d in deps])
        stages.append(Stage(name, deps, run, prints[name]))

    add("world", (), dict(seed=cfg.seed, image_size=cfg.image_size, n=(cfg.n_train, cfg.n_val, cfg.n_test)),
        lambda: stage_world(cfg, p))
    add("judge_a", ("world",), dict(spec=cfg.judge_a, twins=cfg.judge_twin_weights), lambda: stage_judge("A", cfg, p))
    add("judge_b", ("world",), dict(spec=cfg.judge_b, twins=cfg.judge_twin_weights), lambda: stage_judge("B", cfg, p))
    add("gpt2_init", ("world",), cfg.gpt2, lambda: stage_gpt2_init(cfg, p))
    mle = dict(prefix=cfg.prefix_length, lr=cfg.mle_lr, batch=cfg.mle_batch, tokens=cfg.caption_tokens)
    add("mle", ("judge_a", "gpt2_init"), dict(mle, column="captions", steps=cfg.mle_steps),
        lambda: stage_mle("mle", "captions", cfg.mle_steps, cfg, p))
    add("mining", ("judge_a", "judge_b"), dict(sizes=cfg.bag_sizes, top_k=cfg.top_k), lambda: stage_mining(cfg, p))
    if cfg.mle_complete_steps:
        add("mle_complete", ("judge_a", "gpt2_init"), dict(mle, column="complete", steps=cfg.mle_complete_steps),
            lambda: stage_mle("mle_complete", "complete", cfg.mle_complete_steps, cfg, p))
    sr_common = dict(epochs=cfg.sr_epochs, batch=cfg.sr_batch, temperature=cfg.sr_temperature,
                     scale=cfg.sr_reward_scale, lora=(cfg.sr_lora_rank, cfg.sr_lora_alpha), eval_every=cfg.sr_eval_every)
    limits = {m: cfg.caption_tokens for m in cfg.mles()}
    for run in (*cfg.sr_runs, *cfg.select_runs):
        settings = run_settings(run, cfg)
        limits[run.name] = settings["caption_tokens"]
        add(run.name, (run.init, "mining"), dict(run=asdict(run), settings=settings, **sr_common),
            (lambda run=run: stage_sr(run, cfg, p)))
    reported = [*cfg.mles(), *[r.name for r in cfg.sr_runs]]
    for m in reported + [r.name for r in cfg.select_runs]:
        add(f"val_{m}", (m, "mining"), dict(tokens=limits[m]), (lambda m=m: stage_val(m, cfg, p, limits[m])))
    for m in cfg.mles():
        for limit in cfg.val_limits:
            add(f"val_{m}@{limit}", (m, "mining"), dict(tokens=limit),
                (lambda m=m, limit=limit: stage_val(m, cfg, p, limit)))
    if cfg.test_eval:
        for m in reported:
            add(f"eval_{m}", (m, "mining"), dict(tokens=limits[m], distractors=cfg.num_distractors),
                (lambda m=m: stage_eval(m, cfg, p, limits[m])))
        for m in REFERENCE_SYSTEMS:
            add(f"eval_{m}", ("mining",), dict(distractors=cfg.num_distractors), (lambda m=m: stage_eval(m, cfg, p)))
    return stages


def stage_done(p: Paths, stage: Stage) -> bool:
    """Whether ``stage`` has a marker written with the same fingerprint (same settings)."""
    marker = p.stages / f"{stage.name}.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == stage.fingerprint
    except ValueError:
        return False


def _config_from_json(data: dict[str, Any]) -> DemoConfig:
    data = {k: v for k, v in data.items() if k != "fast"}
    for key in ("sr_runs", "select_runs"):
        data[key] = tuple(SRRun(**r) for r in data.get(key, ()))
    for key in ("bag_sizes", "val_limits"):
        data[key] = tuple(data.get(key, ()))
    return DemoConfig(**data)


def run_stage(out: Path, name: str, threads: int = 1) -> dict[str, Any]:
    """Run one stage of the demo in ``out`` (whose ``demo_config.json`` holds the settings) and
    write its marker ``stages/<name>.json`` (with the stage's fingerprint). This is what each
    worker process does."""
    import torch

    torch.set_num_threads(threads)
    p = Paths(Path(out))
    cfg = _config_from_json(json.loads((p.out / "demo_config.json").read_text()))
    graph = {s.name: s for s in stage_graph(cfg, p)}
    stage = graph.get(name)
    if stage is None:
        raise ValueError(f"unknown demo stage {name!r}; the stages of {p.out} are {sorted(graph)}")
    missing = [d for d in stage.deps if not stage_done(p, graph[d])]
    if missing:
        raise RuntimeError(f"demo stage {name} needs {missing} first (run `python -m demo.run --out {p.out}`)")
    start = time.time()
    torch.manual_seed(cfg.seed)
    record = {"seconds": None, "fingerprint": stage.fingerprint, **stage.run()}
    record["seconds"] = round(time.time() - start, 1)
    write_json(p.stages / f"{name}.json", record)
    return record


def run_demo(out: str | os.PathLike, fast: bool = False, seed: int = 0, overwrite: bool = False,
             threads: int = 1, jobs: int = 2, cfg: DemoConfig | None = None, command: str = "python -m demo.run"
             ) -> dict[str, Any]:
    """Run (or resume) every stage, then write ``results.json`` and ``report.html``.

    Args:
        out: output folder; a rerun skips every stage already done with the same settings (each
            stage's marker holds a fingerprint of the settings it used), so changing e.g. one SR
            learning rate redoes that run and its evaluations only.
        fast: the small variant (the test suite's).
        seed: seed of the world and of every training run.
        overwrite: clear ``out`` first.
        threads: torch threads per worker process (1: on 2 cores, two 1-thread workers are much
            faster than one 2-thread process for these small models).
        jobs: worker processes running independent stages at the same time (1 = in this process).
        cfg: explicit settings instead of ``fast``/``seed`` (the study, the selection, experiments).
        command: the command line shown in the report.

    Returns:
        ``write_report``'s summary, or ``{"stages": records}`` when ``cfg.test_eval`` is False.
    """
    from tqdm.auto import tqdm

    cfg = cfg or config_for(fast, seed)
    p = Paths(Path(out))
    if overwrite and p.out.exists():
        for child in p.out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    p.out.mkdir(parents=True, exist_ok=True)
    config = {"fast": fast, **_config_json(cfg)}
    write_json(p.out / "demo_config.json", config)  # what the worker processes read
    stages = stage_graph(cfg, p)
    done = {s.name for s in stages if stage_done(p, s)}
    resumed = bool(done)
    start = time.time()
    bar = tqdm(total=len(stages), initial=len(done), desc="demo", unit="stage", position=0)

    def on_done(name: str) -> None:
        record = json.loads((p.stages / f"{name}.json").read_text())
        bar.update()
        tqdm.write(f"[demo] {name}: {record['seconds']} s")

    if jobs <= 1:
        for stage in stages:
            if stage.name not in done:
                bar.set_postfix_str(stage.name)
                run_stage(p.out, stage.name, threads)
                done.add(stage.name)
                on_done(stage.name)
    else:
        root = Path(__file__).resolve().parent.parent
        run_parallel(stages, done, jobs, threads=threads, log_dir=p.out / "logs", cwd=root, on_done=on_done,
                     command=lambda name: [sys.executable, "-m", "demo.run", "--out", str(p.out), "--stage", name,
                                           "--threads", str(threads)],
                     is_done=lambda name: (p.stages / f"{name}.json").is_file())
    bar.close()
    records = {s.name: json.loads((p.stages / f"{s.name}.json").read_text()) for s in stages}
    if not cfg.test_eval:
        return {"stages": records}
    from demo.report import write_report

    return write_report(p.out, cfg=config, stages=records, wall_seconds=round(time.time() - start, 1),
                        resumed=resumed, command=command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--fast", action="store_true", help="the small variant used by the test suite (~3 min)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of every training run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; see the README)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for independent stages (default: 2)")
    parser.add_argument("--overwrite", action="store_true", help="clear --out first (else finished stages with the "
                        "same settings are reused)")
    parser.add_argument("--judges", choices=JUDGE_RECIPES, default="default",
                        help="judge recipe: default, or positional (judges that see positions and bindings; "
                             "see the README)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage (a worker process)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(Path(args.out), args.stage, args.threads)
        return 0
    try:
        summary = run_demo(args.out, fast=args.fast, cfg=config_for(args.fast, args.seed, judges=args.judges),
                           overwrite=args.overwrite, threads=args.threads, jobs=args.jobs)
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
