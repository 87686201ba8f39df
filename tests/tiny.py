"""Tiny, offline building blocks for tests: a locally trained GPT-2-style BPE tokenizer,
tiny random CLIP judges (transformers and open_clip) and helpers to save them like any
pretrained folder. Nothing here touches the Hub.

Import these functions from any test (``from tests.tiny import build_tokenizer``); the
session-scoped fixtures in ``tests/conftest.py`` wrap them.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image

EOS = "<|endoftext|>"

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "diamond"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]


def caption_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Short scene captions with punctuation, numbers and quotes (tokenizer training text)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c, s, p = rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(PLACES)
        k = rng.choice(["a", "one", "two", "three", "a small", "a large"])
        out.append(f"{k} {c} {s} {p}.")
        out.append(f"A photo of {k} {c} {s}, {p}!")
    out += ["A man's \"red\" umbrella - 3.5 m tall.", "Two cats on a couch...", "It's a dog?"]
    return out


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 400):
    """A GPT-2-style byte-level BPE tokenizer trained locally (eos = pad = bos = id 0)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts or caption_corpus(), vocab_size=vocab_size, min_frequency=1,
                            special_tokens=[EOS], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                            unk_token=EOS, pad_token=EOS)
    return tok


def tiny_clip_config(vocab_size: int, eos_token_id: int, image_size: int = 32, patch_size: int = 8,
                     projection_dim: int = 16, hidden: int = 32, layers: int = 2, heads: int = 2,
                     max_positions: int = 77):
    """A CLIPConfig a few hundred kB in size (random weights when instantiated)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
                eos_token_id=eos_token_id, bos_token_id=eos_token_id, pad_token_id=eos_token_id)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_clip_judge(out_dir: str | Path, tokenizer=None, seed: int = 0, image_size: int = 32) -> Path:
    """Save a tiny random transformers CLIP judge folder (model + tokenizer + image processor)."""
    from transformers import CLIPImageProcessor, CLIPModel

    out_dir = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(len(tokenizer), tokenizer.eos_token_id, image_size=image_size)).eval()
    model.save_pretrained(out_dir)
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    return out_dir


def tiny_open_clip(seed: int = 0, embed_dim: int = 16, image_size: int = 32):
    """A tiny random open_clip CLIP model (uses open_clip's bundled BPE, no download)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg={"image_size": image_size, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    )
    return model.eval()


def random_images(n: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    """n random RGB PIL images."""
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def tiny_clipcap_config(tokenizer, prefix_length: int = 4, mapping_type: str = "mlp", image_size: int = 32, **kw):
    """A ClipCapConfig with a tiny CLIP vision tower and a tiny GPT-2 over `tokenizer`."""
    from modeling_clipcap import ClipCapConfig, caption_stop_token_ids

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8, projection_dim=16)
    eos = tokenizer.eos_token_id
    text = dict(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    kw.setdefault("stop_token_ids", caption_stop_token_ids(tokenizer))
    if mapping_type == "transformer":
        kw.setdefault("mapper_num_layers", 2)
        kw.setdefault("mapper_num_heads", 2)
        kw.setdefault("clip_length", 3)
    return ClipCapConfig(vision_config=vision, text_config=text, prefix_length=prefix_length,
                         mapping_type=mapping_type, **kw)


def build_tiny_clipcap(tokenizer, seed: int = 0, image_size: int = 32, **kw):
    """(model, processor): a tiny random ClipCapForCaptioning in eval mode and its processor."""
    from transformers import CLIPImageProcessor

    from modeling_clipcap import ClipCapForCaptioning, ClipCapProcessor

    torch.manual_seed(seed)
    model = ClipCapForCaptioning(tiny_clipcap_config(tokenizer, image_size=image_size, **kw)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return model, ClipCapProcessor(image_processor, tokenizer)


def save_tiny_clipcap(out_dir: str | Path, tokenizer=None, seed: int = 0, **kw) -> Path:
    """Save a tiny random ClipCap (model + processor, with remote code) to `out_dir`."""
    model, processor = build_tiny_clipcap(tokenizer or build_tokenizer(), seed=seed, **kw)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def sr_config(tmp_path, **overrides):
    """An SRConfig for tiny CPU runs: batches of 6, 6-token captions, random distractors, greedy
    evaluation, no saving or reporting, seeded; `overrides` replace any field."""
    from trainers import SRConfig

    settings = dict(output_dir=str(Path(tmp_path) / "out"), per_device_train_batch_size=6, learning_rate=1e-3,
                    report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, max_new_tokens=6,
                    bag_schedule="rand", eval_num_beams=1, seed=0, data_seed=0)
    settings.update(overrides)
    return SRConfig(**settings)


def caption_dataset(n: int = 24, seed: int = 0, first_id: int = 1000, image_size: int = 40):
    """A COCO-format `datasets.Dataset` (cocoid, image, captions) of n random images, 2 captions each."""
    import datasets

    rng = random.Random(seed)
    corpus = caption_corpus(seed=seed)
    rows = {"cocoid": list(range(first_id, first_id + n)),
            "image": random_images(n, size=image_size, seed=seed),
            "captions": [rng.sample(corpus, 2) for _ in range(n)]}
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
