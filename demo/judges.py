"""Two tiny CLIP judges trained contrastively from scratch on the synthetic world (NDLB Sec. 3 and
4.1: the paper's judge is CLIP ViT-B/32; here the judges are small enough to train on a CPU).

* Judge A (:func:`build_judge_a`) — a transformers ``CLIPModel`` (ViT with 8 px patches, world
  BPE tokenizer). It gives the self-retrieval reward (Eq. 1), mines the bags (Alg. 1-2, App. B.2),
  and its vision tower initialises the captioner's, as ViT-B/32 does for both in the paper.
* Judge B (:func:`build_judge_b`) — an ``open_clip`` CLIP with a different architecture (ViT with
  mean pooling instead of a class token, other width and depth), open_clip's own BPE tokenizer, another
  seed and another data order. It scores every reported R@1, so that SR is never graded by the
  judge it optimised (the notes' pitfall 4).

Both are trained with the symmetric InfoNCE loss of CLIP on a 50/50 mix of complete descriptions
and single sparse references (trained on complete descriptions alone, a judge gives meaningless
scores to partial captions). Text targets that are identical strings within a batch count as one
class (the world's short references repeat, e.g. "three shapes on grey."). Each judge is saved
like any judge and loads with ``metrics.clip_judge.ClipJudge.from_pretrained(folder)``: A as a
transformers folder (model + tokenizer + image processor), B in open_clip's ``local-dir`` layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "JudgeSpec",
    "build_judge_a",
    "build_judge_b",
    "judge_quality",
    "pair_accuracy",
    "pixel_tensor",
    "train_judge",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class JudgeSpec:
    """Size and training recipe of one judge."""

    width: int = 64
    layers: int = 3
    heads: int = 4
    patch_size: int = 4
    text_width: int = 64
    text_layers: int = 2
    embed_dim: int = 64
    context_length: int = 40
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 40
    complete_fraction: float = 0.5
    twin_fraction: float = 0.0
    # std of the vision tower's position embeddings at initialisation (None: the library's own; see
    # :func:`init_position_embeddings`)
    position_init_std: float | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def pixel_tensor(images, image_size: int) -> torch.Tensor:
    """(N, 3, S, S) CLIP-normalised pixels of PIL images that already have size S (the world's
    images): what both judges' preprocessing produces for them (checked in the tests)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])  # (N, S, S, 3)
    if arr.shape[1:3] != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {arr.shape[1:3]}")
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


# -- the two architectures ------------------------------------------------------------------------

@torch.no_grad()
def init_position_embeddings(model, std: float | None) -> None:
    """Re-initialise the vision tower's position embeddings with ``std``.

    transformers' CLIP starts them at std 0.02, about 13x weaker than the patch embeddings of the
    world's images: the image tower starts (nearly) blind to where things are, the text tower then
    has no reason to read position words, and neither ever learns positions (a saddle point of the
    contrastive loss: each tower's gradient towards position is proportional to the other's
    sensitivity to it). Starting the positions as strong as the content breaks the symmetry.
    """
    if std is None:
        return
    param = (model.vision_model.embeddings.position_embedding.weight if hasattr(model, "vision_model")
             else model.visual.positional_embedding)
    param.normal_(0.0, std)


def build_judge_a(tokenizer, spec: JudgeSpec, image_size: int = 32):
    """A transformers ``CLIPModel`` + its image processor. The vision config repeats
    ``projection_dim`` so that ``CLIPVisionModelWithProjection.from_pretrained(folder)`` (the
    captioner's vision tower) loads the judge's projection too."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    eos = tokenizer.eos_token_id
    text = dict(vocab_size=len(tokenizer), hidden_size=spec.text_width, intermediate_size=4 * spec.text_width,
                num_hidden_layers=spec.text_layers, num_attention_heads=max(1, spec.text_width // 32),
                max_position_embeddings=spec.context_length, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=spec.width, intermediate_size=4 * spec.width, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, image_size=image_size, patch_size=spec.patch_size,
                  projection_dim=spec.embed_dim)
    torch.manual_seed(spec.seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.embed_dim))
    init_position_embeddings(model, spec.position_init_std)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size},
                                   image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    return model, processor


def open_clip_model_cfg(spec: JudgeSpec, image_size: int = 32) -> dict[str, Any]:
    """open_clip ``model_cfg`` of judge B (a ViT with mean pooling; open_clip's default BPE)."""
    return {
        "embed_dim": spec.embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": spec.layers, "width": spec.width,
                       "head_width": spec.width // spec.heads, "patch_size": spec.patch_size, "pool_type": "avg"},
        "text_cfg": {"context_length": spec.context_length, "vocab_size": 49408, "width": spec.text_width,
                     "heads": max(1, spec.text_width // 32), "layers": spec.text_layers},
    }


def build_judge_b(spec: JudgeSpec, image_size: int = 32):
    """An open_clip ``CLIP`` built from :func:`open_clip_model_cfg`, its eval transform and tokenizer."""
    import open_clip

    cfg = open_clip_model_cfg(spec, image_size)
    torch.manual_seed(spec.seed)
    model = open_clip.CLIP(**cfg)
    init_position_embeddings(model, spec.position_init_std)
    preprocess = open_clip.image_transform(image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=spec.context_length)
    return model, preprocess, tokenizer, cfg


def save_judge_b(model, cfg: dict[str, Any], out_dir: str | Path, image_size: int = 32) -> Path:
    """open_clip ``local-dir`` layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    config = {"model_cfg": cfg, "preprocess_cfg": {"size": image_size, "mean": list(OPENAI_MEAN),
                                                   "std": list(OPENAI_STD), "interpolation": "bicubic",
                                                   "resize_mode": "shortest"}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return out


# -- training ---------------------------------------------------------------------------------------

def _encoders(model) -> tuple[Callable, Callable]:
    """(encode_images(pixels), encode_texts(tokens dict)) returning unnormalised embeddings."""
    if hasattr(model, "get_image_features"):
        from metrics.clip_judge import _pooled

        return (lambda px: _pooled(model.get_image_features(pixel_values=px)),
                lambda tok: _pooled(model.get_text_features(**tok)))
    return (lambda px: model.encode_image(px), lambda tok: model.encode_text(tok["input_ids"]))


def train_judge(model, tokenize: Callable[[list[str]], dict[str, torch.Tensor]], pixels: torch.Tensor,
                references: list[list[str]], complete: list[str], spec: JudgeSpec,
                twin_pixels: torch.Tensor | None = None, twin_complete: list[str] | None = None,
                progress_desc: str = "judge", log: list | None = None) -> list[dict[str, float]]:
    """Contrastive training (CLIP's symmetric InfoNCE, learned temperature) from scratch.

    Args:
        model: a transformers ``CLIPModel`` or an open_clip ``CLIP``.
        tokenize: the judge's own text pipeline (``ClipJudge.tokenize``), texts -> tensors.
        pixels: (N, 3, S, S) normalised training images.
        references / complete: the N images' sparse references and complete descriptions.
        spec: steps, batch size, learning rate, the complete/sparse mix and the seed of the data
            order.
        twin_pixels / twin_complete: optional minimal pairs (:func:`demo.world.twin` of each
            training image and its complete description): a ``spec.twin_fraction`` of every batch
            is made of (image, twin) pairs described completely, hard negatives that teach the
            judge to bind attributes to objects.

    Returns:
        The training log (step, loss, in-batch accuracy, seconds).
    """
    from tqdm.auto import tqdm

    n = pixels.shape[0]
    rng = np.random.default_rng([spec.seed, 7])
    encode_images, encode_texts = _encoders(model)
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in name)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / spec.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps))))
    model.train()
    log = [] if log is None else log
    start = time.time()
    for step in tqdm(range(spec.steps), desc=progress_desc, unit="step"):
        rows = rng.choice(n, size=min(spec.batch_size, n), replace=False)
        texts = [complete[r] if rng.random() < spec.complete_fraction else
                 references[r][rng.integers(len(references[r]))] for r in rows]
        batch_pixels = pixels[rows]
        n_twins = int(spec.twin_fraction * len(rows) / 2) if twin_pixels is not None else 0
        if n_twins:  # the last n_twins rows get their twin in the batch, all described completely
            pairs = rows[-n_twins:]
            batch_pixels = torch.cat([batch_pixels[:-n_twins], pixels[pairs], twin_pixels[pairs]])
            texts = texts[:-n_twins] + [complete[r] for r in pairs] + [twin_complete[r] for r in pairs]
            rows = np.concatenate([rows[:-n_twins], pairs, pairs])
        img = F.normalize(encode_images(batch_pixels), dim=-1)  # (B, d)
        txt = F.normalize(encode_texts(tokenize(texts)), dim=-1)  # (B, d)
        scale = model.logit_scale.exp()  # kept <= 100 below, as CLIP's training does
        logits = scale * txt @ img.T  # (B texts, B images)
        # identical strings in the batch are one class: spread the target over their images
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target_t2i = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target_t2i * logits.log_softmax(1)).sum(1).mean()
                      - (target_t2i * logits.T.log_softmax(1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # the saved logit scale is the one used here (the SR reward reads it)
            model.logit_scale.clamp_(max=math.log(100.0))
        if step % 20 == 0 or step == spec.steps - 1:
            acc = (logits.argmax(1) == torch.arange(len(rows))).float().mean().item()
            log.append({"step": step, "loss": loss.item(), "acc": acc, "scale": scale.item(),
                        "seconds": round(time.time() - start, 1)})
    model.eval()
    return log


@torch.no_grad()
def judge_quality(judge, images, references: list[list[str]], complete: list[str], pool: int = 100,
                  seed: int = 0) -> dict[str, float]:
    """How well a trained judge reads the world (held-out images): ``complete_r1`` / ``sparse_r1``,
    the text -> image R@1 of a complete description / one sparse reference among ``pool`` images
    (its own + random others)."""
    from metrics.clip_judge import similarity

    n = len(images)
    img = judge.embed_images(list(images))
    rng = np.random.default_rng(seed)
    out = {}
    for name, texts in (("complete_r1", complete), ("sparse_r1", [r[0] for r in references])):
        txt = judge.embed_texts(list(texts))
        hits = []
        for i in range(n):
            others = rng.choice(np.delete(np.arange(n), i), size=min(pool - 1, n - 1), replace=False)
            cand = np.concatenate([[i], others])
            sim = similarity(txt[i : i + 1], img[cand])[0]
            hits.append(bool(sim[0] > sim[1:].max()))
        out[name] = float(np.mean(hits))
    return out


@torch.no_grad()
def pair_accuracy(judge, images, complete: list[str], pairs: dict[str, tuple[list[int], list, list[str]]]
                  ) -> dict[str, dict[str, float]]:
    """Minimal-pair accuracy per kind of change (``demo.run.pair_sets``): the share of pairs in
    which the complete description of an image is closer to that image than to its twin (the same
    scene with one thing changed), i.e. the judge retrieves the right image of the pair from the
    text; ``both``: and the twin's description is closer to the twin too. ``all``: every pair.

    Returns ``{kind: {"accuracy", "both", "pairs"}}``.
    """
    img = judge.embed_images(list(images))
    txt = judge.embed_texts(list(complete))
    out, hits_all, both_all = {}, [], []
    for kind, (rows, twin_images, twin_texts) in pairs.items():
        if not rows:
            continue
        twin_img = judge.embed_images(list(twin_images))
        twin_txt = judge.embed_texts(list(twin_texts))
        hits = (txt[rows] * img[rows]).sum(-1) > (txt[rows] * twin_img).sum(-1)
        back = (twin_txt * twin_img).sum(-1) > (twin_txt * img[rows]).sum(-1)
        out[kind] = {"accuracy": float(hits.float().mean()), "both": float((hits & back).float().mean()),
                     "pairs": len(rows)}
        hits_all.append(hits)
        both_all.append(hits & back)
    if hits_all:
        hits, both = torch.cat(hits_all), torch.cat(both_all)
        out["all"] = {"accuracy": float(hits.float().mean()), "both": float(both.float().mean()), "pairs": len(hits)}
    return out
