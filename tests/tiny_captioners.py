"""Tiny random captioners saved like Hub folders, for the evaluation tests (offline, seconds).

- ``save_tiny_blip``: ``BlipForConditionalGeneration`` + ``BlipProcessor`` (an unprompted
  image-to-text model; a WordPiece tokenizer trained on tests/tiny.py's corpus);
- ``save_tiny_coca``: an open_clip CoCa in open_clip's ``local-dir`` layout
  (``open_clip_config.json`` + ``open_clip_model.safetensors``; open_clip's bundled BPE);
- the LLaVA-style chat VLM is ``tests.test_vcb_transformers.save_tiny_llava``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny import caption_corpus

TINY_COCA_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2, "dim_head": 16},
}


def build_wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer trained locally, with BLIP's ``[DEC]`` bos token."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(caption_corpus(), vocab_size=300, min_frequency=1, show_progress=False,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = BertTokenizerFast(tokenizer_object=wp._tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def save_tiny_blip(out: str | Path, seed: int = 0) -> str:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = build_wordpiece_tokenizer()
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                encoder_hidden_size=32, bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    config = BlipConfig(vision_config=vision, text_config=text, projection_dim=16)
    BlipForConditionalGeneration(config).save_pretrained(out)
    proc.save_pretrained(out)
    return str(out)


def build_tiny_coca(seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CoCa(**TINY_COCA_CFG).eval()
    with torch.no_grad():  # a random decoder that prefers different tokens for different images
        model.text_decoder.text_projection.normal_(0, 2.0)
    return model


def save_tiny_coca(out: str | Path, seed: int = 0) -> str:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**TINY_COCA_CFG, "custom_text": True},
                                                                 "preprocess_cfg": {}}))
    save_file(build_tiny_coca(seed).state_dict(), str(out / "open_clip_model.safetensors"))
    return str(out)


BENCH_IDS = [301, 302, 303, 304, 305, 306]
BENCH_BAGS = [[301, 302, 303], [304, 305, 306]]


def make_benchmark(root: str | Path) -> Path:
    """A small generated benchmark under ``root``: six random PNG images (``images/<id>.png``), the
    authors' TrueMatch format with two bags of 3 (``authors/3.json``) and references
    (``refs.json``, two captions per image)."""
    from tests.tiny import COLOURS, random_images

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for cid, im in zip(BENCH_IDS, random_images(len(BENCH_IDS), size=40, seed=5)):
        im.save(root / "images" / f"{cid}.png")
    (root / "authors").mkdir(exist_ok=True)
    (root / "authors" / "3.json").write_text(json.dumps(BENCH_BAGS))
    refs = {str(c): [f"a {w} circle.", f"one {w} square on the left."] for c, w in zip(BENCH_IDS, COLOURS)}
    (root / "refs.json").write_text(json.dumps(refs))
    return root


def benchmark_args(root: Path) -> list[str]:
    """evaluate_captions.py data arguments for :func:`make_benchmark`'s folder."""
    return ["--truematch", str(root / "authors"), "--truematch-images", str(root / "images"), "--bag-sizes", "3",
            "--references", str(root / "refs.json"), "--images", str(root / "images"), "--num-distractors", "3"]
