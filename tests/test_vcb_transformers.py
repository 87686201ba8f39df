"""The `transformers` backend end to end with tiny random local models (issue 6).

Tiny models built offline from configs and saved like Hub folders:
- chat LLM: ``LlamaForCausalLM`` + the locally trained BPE of tests/tiny.py with a ChatML-style
  ``chat_template``;
- VLM as in the paper: ``InstructBlipForConditionalGeneration`` (tiny vision tower, Q-Former,
  Llama LM) + ``InstructBlipProcessor`` (BlipImageProcessor, the BPE as LM and Q-Former
  tokenizer; no chat template: the processor gets the bare prompt);
- chat VLM: ``LlavaForConditionalGeneration`` (tiny CLIP vision tower + Llama) + ``LlavaProcessor``
  with a chat template.
Their outputs are gibberish: the tests check that the pipeline runs, writes one record per id
with provenance, and that batched greedy decoding equals batch size 1 and a hand-written
greedy loop.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from jinja2 import TemplateError

from datasets_scripts.vcb import STAGES, GenRequest, load_prompt, load_split, read_records
from datasets_scripts.vcb.hf_backend import TransformersChatBackend, TransformersVisionBackend
from tests.test_vcb_support import coco_captions, image_file_bytes, make_coco
from tests.tiny import build_tokenizer

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] is string %}{{ m['content'] }}{% else %}"
          "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
          "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}[{{ m['role'] }}] {{ m['content'] }}{{ '\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}[assistant]{% endif %}")
IDS = [21, 22, 23, 24]


def _llama(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _tokenizer(tok_dir):
    """A fresh copy of the locally trained BPE (training it once per module saves seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def save_tiny_chat_llm(out, tok_dir, template: str = CHATML):
    from transformers import LlamaForCausalLM

    tok = _tokenizer(tok_dir)
    tok.chat_template = template
    torch.manual_seed(0)
    LlamaForCausalLM(_llama(len(tok))).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def save_tiny_instructblip(out, tok_dir):
    from transformers import (BlipImageProcessor, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor)

    tok, qtok = _tokenizer(tok_dir), _tokenizer(tok_dir)
    proc = InstructBlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                                 tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=4)   # adds <image>
    cfg = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=len(qtok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128),
        text_config=_llama(len(tok)).to_dict(), num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return str(out)


def save_tiny_llava(out, tok_dir):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tok = _tokenizer(tok_dir)
    tok.add_tokens(["<image>"], special_tokens=True)
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", chat_template=CHATML,
                          image_token="<image>", num_additional_image_tokens=1)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8),
                      text_config=_llama(len(tok)), image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    tok_dir = root / "tokenizer"
    build_tokenizer().save_pretrained(tok_dir)
    coco_root = root / "coco"
    return {"llm": save_tiny_chat_llm(root / "llm", tok_dir), "instructblip": save_tiny_instructblip(root / "ib", tok_dir),
            "llava": save_tiny_llava(root / "llava", tok_dir), "coco_root": coco_root, "tok_dir": tok_dir,
            "coco": make_coco(coco_root, {"train": IDS})}


def _blend_requests():
    tpl = load_prompt("blendcap")
    return [GenRequest(c, tpl.messages(captions=coco_captions(c, n=3 + c % 3))) for c in IDS[:3]]


def _greedy_reference(model, input_ids, n_new: int, eos: int) -> list[int]:
    """Hand-written greedy decoding (full forward each step, no cache), stopping at eos."""
    ids = input_ids.clone()
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_chat_llm_batched_equals_single_and_hand_greedy(tiny):
    reqs = _blend_requests()
    b3 = TransformersChatBackend(tiny["llm"], device="cpu", batch_size=3, max_new_tokens=6)
    b1 = TransformersChatBackend(tiny["llm"], device="cpu", batch_size=1, max_new_tokens=6)
    batched, single = b3.generate(reqs), b1.generate(reqs)
    assert [r.cocoid for r in batched] == IDS[:3]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in single]
    # the prompts have different lengths, so the batch really was padded
    lens = {len(b3.tokenizer(b3.render(r.messages), add_special_tokens=False).input_ids) for r in reqs}
    assert len(lens) == 3
    # independent reference: greedy by hand from the chat-templated prompt
    prompt = b1.render(reqs[0].messages)
    assert prompt.startswith("<|system|>You are given a reference set of 5 image captions.")
    assert prompt.endswith("<|assistant|>")
    ids = b1.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    ref = _greedy_reference(b1.lm, ids, 6, eos=0)
    assert batched[0].text == b1.tokenizer.decode(ref, skip_special_tokens=True)
    assert batched[0].finish_reason == ("stop" if 0 in ref else "length")
    assert b3.settings()["batch_size"] == 3 and b3.settings()["do_sample"] is False


def test_chat_llm_merges_system_prompt_when_template_has_no_system_role(tiny, tmp_path):
    path = save_tiny_chat_llm(tmp_path / "nosys", tiny["tok_dir"], template=NO_SYSTEM)
    req = _blend_requests()[0]
    auto = TransformersChatBackend(path, device="cpu", max_new_tokens=2)
    text = auto.render(req.messages)
    assert auto.system_mode_used == "merge"
    assert text.startswith("[user] You are given a reference set of 5 image captions.")
    assert "\n\nReference caption 1: A plate full of food" in text
    strict = TransformersChatBackend(path, device="cpu", max_new_tokens=2, system_mode="system")
    with pytest.raises(TemplateError, match="System role not supported"):
        strict.render(req.messages)


@pytest.mark.parametrize("kind", ["instructblip", "llava"])
def test_vlm_batched_equals_single(tiny, kind):
    data = load_split(tiny["coco"], "train")
    msgs = load_prompt("visualcap").messages()
    reqs = [GenRequest(c, msgs, image=img) for c, img in zip(IDS[:3], data.image_bytes(IDS[:3]))]
    b3 = TransformersVisionBackend(tiny[kind], device="cpu", batch_size=3, max_new_tokens=5)
    b1 = TransformersVisionBackend(tiny[kind], device="cpu", batch_size=1, max_new_tokens=5)
    batched, single = b3.generate(reqs), b1.generate(reqs)
    assert [r.text for r in batched] == [r.text for r in single]
    assert all(r.finish_reason in ("stop", "length") for r in batched)
    prompt = b1.render(msgs)
    if kind == "instructblip":    # no chat template: the paper's bare prompt
        assert prompt == "Briefly describe the content of the image."
    else:
        assert prompt == "<|user|><image>Briefly describe the content of the image.\n<|assistant|>"
    # the decoded text holds only new tokens (no prompt echo, no image placeholders)
    assert all("Briefly describe" not in r.text and "<image>" not in r.text for r in batched)


SHORT_PROMPTS = {
    "blendcap": "stage: blendcap\nsystem: Blend the captions.\nuser_template: |-\n  {% for c in captions[:2] -%}\n"
                "  Reference caption {{ loop.index }}: {{ c }}\n  {% endfor %}\nexamples:\n"
                "  - captions: [a red circle., a circle on the left.]\n    output: a red circle on the left.\n",
    "visualcap": "stage: visualcap\nsystem: null\nuser_template: Briefly describe the content of the image.\n",
    "holisticcap": "stage: holisticcap\nsystem: Improve the correct caption.\nuser_template: |-\n"
                   "  Correct caption: {{ blendcap }}\n  New noisy caption: {{ visualcap }}\nexamples: []\n",
}


def test_transformers_backend_end_to_end_cli(tiny, tmp_path):
    """CLI run with the tiny LLM and InstructBLIP (short prompts from --prompts-dir keep it fast)."""
    from datasets_scripts.vcb import load_prompts
    from datasets_scripts.vcb.__main__ import main

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for stage, text in SHORT_PROMPTS.items():
        (prompts / f"{stage}.yaml").write_text(text)
    templates = load_prompts(prompts)
    old = signal.getsignal(signal.SIGTERM)
    base = ["run", "--dataset", str(tiny["coco"]), "--split", "train", "--backend", "transformers",
            "--llm", tiny["llm"], "--vlm", tiny["instructblip"], "--device", "cpu", "--max-new-tokens", "4",
            "--no-progress", "--shard-size", "2", "--prompts-dir", str(prompts)]
    try:
        assert main(base + ["--out", str(tmp_path / "b2"), "--batch-size", "3"]) == 0
        assert main(base + ["--out", str(tmp_path / "b1"), "--batch-size", "1"]) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    for stage in STAGES:
        b2, b1 = read_records(tmp_path / "b2" / stage), read_records(tmp_path / "b1" / stage)
        assert sorted(b2) == IDS
        assert {c: r["raw"] for c, r in b2.items()} == {c: r["raw"] for c, r in b1.items()}, stage
        model = tiny["instructblip"] if stage == "visualcap" else tiny["llm"]
        for r in b2.values():
            assert r["model"] == model and r["backend"] == "transformers"
            assert r["prompt_sha256"] == templates[stage].sha256 and isinstance(r["flags"], list)
        [manifest] = [json.loads(p.read_text()) for p in (tmp_path / "b2" / stage / "runs").glob("*.json")]
        assert manifest["status"] == "finished" and manifest["generation"]["batch_size"] == 3
        assert manifest["generation"]["device"] == "cpu" and manifest["generation"]["max_new_tokens"] == 4
        assert manifest["prompt"]["sha256"] == templates[stage].sha256
        # the hash covers the prompt's content, not its file: the short visualcap file has the paper's text
        assert (templates[stage].sha256 == load_prompt(stage).sha256) == (stage == "visualcap")
        assert manifest["prompt"]["source"] == str(prompts / f"{stage}.yaml")
        assert manifest["report"]["new"] == len(IDS) and manifest["report"]["captions_per_s"] > 0
    # the VLM saw this id's image: same request by hand gives the same answer
    vlm = TransformersVisionBackend(tiny["instructblip"], device="cpu", max_new_tokens=4)
    [res] = vlm.generate([GenRequest(IDS[1], load_prompt("visualcap").messages(),
                                     image=image_file_bytes(tiny["coco_root"], IDS[1]))])
    assert read_records(tmp_path / "b1" / "visualcap")[IDS[1]]["raw"] == res.text
