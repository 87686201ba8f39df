"""The authors' release class (`manugaurdl/nldb_hf_hosting`, `model.py`: `ClipCapSender`) in
miniature, run under the transformers 4.29.2 their `requirements.txt` pins, so that decoding can
be compared caption for caption with the converted model (tests/test_authors_decoding.py).

    python -m tests.ndlb_release SPEC.json     # under tests/pinned_stack.py's transformers 4.29.2

For each run in the spec it builds a tiny `ClipCapSender` (tiny OpenAI-layout CLIP ViT, tiny GPT-2
over the test tokenizer, the release's 10-token MLP prefix and its embedding "patch" for batches of
32), sets every weight from a seeded generator, saves it with the class's own
`PyTorchModelHubMixin.save_pretrained` (model.safetensors + config.json: the release's Hub
layout), captions random pixel values with the class's `forward` (their `gpt.generate` call: beam
search with their stop processor, `max_length` counting the prefix, `batch_decode` with
`clean_up_tokenization_spaces=True`) and writes what `generate` returned: the captions, the
release's beams, greedy ids and, with `top`, the `top` best beams with their scores.

`ReleaseSender` follows the release's construction and decoding call. With `release_code` in the
spec (a checkout of nldb_hf_hosting; $NDLB_RELEASE_CODE in the test) their own `model.py` is
imported instead, with `clip.load`, `GPT2LMHeadModel.from_pretrained` and
`GPT2Tokenizer.from_pretrained` pointed at the tiny parts. The module imports only torch,
transformers and huggingface_hub, so it also loads under this repository's stack (test_converters
uses its OpenAI-layout ViT).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

WIDTH, HEADS, PATCH, IMAGE, EMBED_DIM = 32, 2, 8, 32, 16  # tiny CLIP ViT: 16 patches + class token
N_EMBD, PREFIX, BATCH = 32, 10, 32  # tiny GPT-2; the release's 10 prefix tokens, patched for batches of 32


# -- OpenAI CLIP's vision tower, with its parameter names -------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class OpenAIResBlock(nn.Module):
    """OpenAI CLIP's ResidualAttentionBlock: nn.MultiheadAttention (fused in_proj) + QuickGELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):  # (L, N, D)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAIVisionTransformer(nn.Module):
    """OpenAI CLIP's VisionTransformer with its parameter names (conv1, class_embedding, ...)."""

    def __init__(self, width=WIDTH, layers=2, heads=HEADS, patch=PATCH, image=IMAGE, output_dim=EMBED_DIM):
        super().__init__()
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[OpenAIResBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim) * width**-0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # (B, grid², width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)  # (L, B, D)
        x = self.transformer.resblocks(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj  # (B, output_dim)


class TinyOpenAIClip(nn.Module):
    """What `clip.load` returns, reduced to the part the release uses (`.visual`)."""

    def __init__(self):
        super().__init__()
        self.visual = OpenAIVisionTransformer()


# -- the release's classes in miniature (transformers 4.29.2) ---------------------------------------


def tiny_parts(tokenizer_dir: str):
    """(clip loader, GPT-2 factory, tokenizer factory) standing in for `clip.load("ViT-B/32")`,
    `GPT2LMHeadModel.from_pretrained("gpt2")` and `GPT2Tokenizer.from_pretrained("gpt2")`."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    def tokenizer(*args, **kwargs):
        return GPT2Tokenizer(f"{tokenizer_dir}/vocab.json", f"{tokenizer_dir}/merges.txt")

    def gpt2(*args, **kwargs):
        tok = tokenizer()
        config = GPT2Config(vocab_size=len(tok), n_embd=N_EMBD, n_layer=2, n_head=2, n_positions=128,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        return GPT2LMHeadModel(config)

    return (lambda name, *args, **kwargs: (TinyOpenAIClip().eval(), None)), gpt2, tokenizer


def release_sender_class(tokenizer_dir: str, release_code: str | None = None):
    """The class to build: the authors' `ClipCapSender` from `release_code`/model.py (patched to use
    the tiny parts), or `ReleaseSender`, written after it."""
    clip_load, gpt2, tokenizer = tiny_parts(tokenizer_dir)
    if release_code:
        from transformers import GPT2LMHeadModel, GPT2Tokenizer

        sys.modules["clip"] = types.SimpleNamespace(load=clip_load)
        GPT2LMHeadModel.from_pretrained = staticmethod(gpt2)
        GPT2Tokenizer.from_pretrained = staticmethod(tokenizer)
        spec = importlib.util.spec_from_file_location("nldb_release_model", Path(release_code) / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.ClipCapSender
    return make_release_sender(clip_load, gpt2, tokenizer)


def make_release_sender(clip_load, gpt2, tokenizer):
    from huggingface_hub import PyTorchModelHubMixin
    from transformers import LogitsProcessor, LogitsProcessorList

    class EndAfterPeriod(LogitsProcessor):
        """The release's `StopTokenLogitsProcessor`: after a token containing ".", every real token gets
        the float32 minimum, the extra (prefix) rows -inf, and end-of-text 0."""

        def __init__(self, tok):
            self.vocab_size, self.eos = len(tok), tok.eos_token_id
            tokens = tok.convert_ids_to_tokens(list(range(self.vocab_size)))
            self.stop = torch.tensor([i for i, t in enumerate(tokens) if "." in t])

        def __call__(self, input_ids, scores):
            rows = torch.isin(input_ids[:, -1], self.stop)
            scores[rows, : self.vocab_size] = torch.finfo(torch.float32).min
            scores[rows, self.vocab_size :] = float("-inf")
            scores[rows, self.eos] = 0.0
            return scores

    class ReleaseSender(nn.Module, PyTorchModelHubMixin):
        """`ClipCapSender` (CLIP + `ClipCapModel`) as far as captioning goes; same init arguments,
        parameter names and `generate` call."""

        def __init__(self, clip_model: str, clipcap_path: str | None, official_clipcap_weights: str | None,
                     best_model_path: str | None, train_method: str, do_sample: bool = False, beam_size: int = 5,
                     max_len: int = 20):
            super().__init__()
            self.clip, _ = clip_load(clip_model)
            self.clipcap = nn.Module()
            self.clipcap.gpt, self.clipcap.tokenizer = gpt2(), tokenizer()
            self.clipcap.gpt.config.pad_token_id = self.clipcap.gpt.config.eos_token_id
            self.do_sample, self.beam_size, self.max_len = do_sample, beam_size, max_len
            self.stop = EndAfterPeriod(self.clipcap.tokenizer)
            hidden = PREFIX * N_EMBD // 2
            self.clipcap.clip_project = nn.Module()
            self.clipcap.clip_project.model = nn.Sequential(nn.Linear(self.clip.visual.output_dim, hidden), nn.Tanh(),
                                                            nn.Linear(hidden, PREFIX * N_EMBD))
            # maybe_patch_gpt(batch 32 x 10 prefix rows): extra embedding rows, a bias -inf on them
            gpt, vocab = self.clipcap.gpt, len(self.clipcap.tokenizer)
            gpt.resize_token_embeddings(vocab + BATCH * PREFIX)
            bias = torch.zeros(vocab + BATCH * PREFIX)
            bias[vocab:] = float("-inf")
            gpt.lm_head.bias = nn.Parameter(bias, requires_grad=False)

        @torch.no_grad()
        def forward(self, images: torch.Tensor):
            prompts = self.clipcap.clip_project.model(self.clip.visual(images)).view(images.shape[0], PREFIX, -1)
            gpt, tok = self.clipcap.gpt, self.clipcap.tokenizer
            start = len(tok)
            n = images.shape[0] * PREFIX
            gpt.get_input_embeddings().weight.data[start : start + n] = prompts.reshape(n, -1)
            input_ids = torch.arange(start, start + n).view(images.shape[0], PREFIX)
            generated = gpt.generate(input_ids, do_sample=self.do_sample, max_length=self.max_len,
                                     num_beams=self.beam_size, num_return_sequences=1,
                                     logits_processor=LogitsProcessorList([self.stop]), top_k=len(tok))
            captions = tok.batch_decode(generated[:, PREFIX:], skip_special_tokens=True,
                                        clean_up_tokenization_spaces=True)
            return captions, None, None

    return ReleaseSender


# -- one run ----------------------------------------------------------------------------------------


def set_weights_(sender: nn.Module, seed: int, stop_bias: float) -> None:
    """Every weight from a seeded generator, by parameter name (so the release's own class and
    `ReleaseSender` get the same ones): LayerNorm gains 1 + noise, the mapper N(0, 1), the rest
    N(0, 0.3²); the lm_head bias 0 on the real vocabulary, `stop_bias` on tokens containing ".",
    -inf on the patch rows (as the release)."""
    g = torch.Generator().manual_seed(seed)
    gpt = sender.clipcap.gpt
    vocab = gpt.lm_head.bias.shape[0] - BATCH * PREFIX
    with torch.no_grad():
        for name, p in sorted(sender.named_parameters(remove_duplicate=True)):
            if name == "clipcap.gpt.lm_head.bias":
                continue
            scale = 1.0 if name.startswith("clipcap.clip_project") else 0.3
            gain = 1.0 if p.ndim == 1 and (".ln_" in name or "norm" in name) and name.endswith("weight") else 0.0
            p.copy_(gain + torch.randn(p.shape, generator=g) * scale)
        tokens = sender.clipcap.tokenizer.convert_ids_to_tokens(list(range(vocab)))
        bias = torch.zeros_like(gpt.lm_head.bias)
        bias[[i for i, t in enumerate(tokens) if "." in t]] = stop_bias
        bias[vocab:] = float("-inf")
        gpt.lm_head.bias.copy_(bias)


def caption_run(sender_cls, run: dict, out: Path) -> dict:
    """Build, save and caption one spec run; returns the JSON-able record."""
    from safetensors.torch import save_file

    torch.manual_seed(run["seed"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({}, out / "best.pt")  # the release reloads its best weights from here: none
    sender = sender_cls(clip_model="ViT-B/32", clipcap_path=None, official_clipcap_weights=None,
                        best_model_path=str(out / "best.pt"), train_method="mle", do_sample=False, beam_size=5,
                        max_len=run["max_len"])
    set_weights_(sender, run["seed"], run["stop_bias"])
    sender.eval()
    sender.save_pretrained(out / "release")
    pixel_values = torch.randn(run["images"], 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(run["seed"] + 1))
    save_file({"pixel_values": pixel_values}, str(out / "pixel_values.safetensors"))

    record = {"beams": [], "greedy": [], "top": [], "top_scores": []}
    gpt = sender.clipcap.gpt
    generate = gpt.generate

    def recording_generate(input_ids, **kwargs):  # the release's call, and the same with other settings
        ids = generate(input_ids, **kwargs)
        record["beams"] += ids[:, PREFIX:].tolist()
        record["greedy"] += generate(input_ids, **{**kwargs, "num_beams": 1})[:, PREFIX:].tolist()
        if run.get("top"):
            top = generate(input_ids, **{**kwargs, "num_return_sequences": run["top"], "return_dict_in_generate": True,
                                         "output_scores": True})
            record["top"] += top.sequences[:, PREFIX:].tolist()
            record["top_scores"] += top.sequences_scores.tolist()
        return ids

    gpt.generate = recording_generate
    captions = []
    for start in range(0, run["images"], BATCH):
        captions += sender(pixel_values[start : start + BATCH])[0]
    record["captions"] = captions
    return record


def main(argv: list[str]) -> int:
    import transformers

    spec = json.loads(Path(argv[0]).read_text())
    sender_cls = release_sender_class(spec["tokenizer"], spec.get("release_code"))
    result = {"transformers": transformers.__version__, "class": f"{sender_cls.__module__}.{sender_cls.__name__}",
              "runs": {}}
    for run in spec["runs"]:
        result["runs"][run["name"]] = caption_run(sender_cls, run, Path(spec["out"]) / run["name"])
    (Path(spec["out"]) / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
