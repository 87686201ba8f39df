"""Each captioning backend captions a small generated benchmark end to end (issue 18): tiny random
ClipCap, LLaVA-style chat VLM, BLIP (unprompted image-to-text), open_clip CoCa, and an
OpenAI-compatible server on 127.0.0.1; the captions are checked against an independent computation
(the model called by hand on one image at a time, a hand-written greedy loop for CoCa, the fake
server's known answer), and the cache serves a second run without calling the model."""

from __future__ import annotations

import pytest
import torch

from evaluation import load_benchmarks
from evaluation.benchmarks import image_bytes
from evaluation.caption_cache import CaptionCache, caption_images
from evaluation.captioners import DEFAULT_PROMPT, ModelSpec, load_captioner, parse_model_spec
from tests import tiny
from tests.test_vcb_support import VLM, FakeOpenAIServer, fake_visual
from tests.test_vcb_transformers import save_tiny_llava
from tests.tiny_captioners import BENCH_IDS, make_benchmark, save_tiny_blip, save_tiny_coca

CPU = dict(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = make_benchmark(tmp_path_factory.mktemp("bench"))
    data = load_benchmarks(truematch=str(root / "authors"), truematch_images=str(root / "images"), bag_sizes=[3])
    images = data.images_to_caption()
    assert list(images) == [str(c) for c in BENCH_IDS]
    return root, images


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    tok_dir = root / "tokenizer"
    tiny.build_tokenizer().save_pretrained(tok_dir)
    return {"llava": save_tiny_llava(root / "llava", tok_dir), "blip": save_tiny_blip(root / "blip"),
            "coca": save_tiny_coca(root / "coca")}


def _pil(images):
    from metrics.image_loading import open_image

    return [open_image(image_bytes(im)) for im in images.values()]


def _no_model_calls(captioner, monkeypatch):
    def refuse(images):
        raise AssertionError(f"the model was called for {len(images)} cached images")

    monkeypatch.setattr(captioner, "caption", refuse)


def test_clipcap_captions_as_the_model_and_reuses_its_cache(bench, tiny_clipcap_dir, tmp_path, monkeypatch):
    from modeling_clipcap import ClipCapForCaptioning, ClipCapProcessor

    _, images = bench
    cap = load_captioner(f"clipcap:{tiny_clipcap_dir}?num_beams=1&max_new_tokens=6", batch_size=4, **CPU)
    captions, counts = caption_images(cap, images, tmp_path / "cache", progress=False)
    assert counts == {"images": 6, "cached": 0, "captioned": 6}
    model = ClipCapForCaptioning.from_pretrained(tiny_clipcap_dir)
    processor = ClipCapProcessor.from_pretrained(tiny_clipcap_dir)
    for (cid, caption), im in zip(captions.items(), _pil(images)):   # one image at a time, by hand
        ids = model.generate(pixel_values=processor(images=[im])["pixel_values"], num_beams=1, max_new_tokens=6)
        assert caption == processor.batch_decode(ids)[0], cid
    assert cap.num_parameters() == sum(p.numel() for p in model.parameters())
    assert cap.settings()["generation"] == {"num_beams": 1, "max_new_tokens": 6}

    _no_model_calls(cap, monkeypatch)  # a rerun: every caption from the cache
    again, counts = caption_images(cap, images, tmp_path / "cache", progress=False)
    assert again == captions and counts == {"images": 6, "cached": 6, "captioned": 0}
    # other settings, another cache entry; "auto" dtype = bf16 where the CPU has it
    other = load_captioner(f"clipcap:{tiny_clipcap_dir}", device="cpu", dtype="auto")
    from metrics.clip_judge import resolve_dtype

    assert other.settings()["dtype"] == str(resolve_dtype("auto", "cpu"))
    assert CaptionCache(tmp_path, other.settings()).path != CaptionCache(tmp_path, cap.settings()).path
    assert other.settings()["generation"]["num_beams"] == other.model.generation_config.num_beams


def test_transformers_chat_vlm(bench, models, tmp_path):
    """A LLaVA-style AutoModelForImageTextToText with a chat template: the default short-caption
    instruction, batched = one image at a time; the VisualCap prompt on request."""
    _, images = bench
    cap = load_captioner(f"transformers:{models['llava']}?max_new_tokens=5", batch_size=4, **CPU)
    assert cap.rendered == f"<|user|><image>{DEFAULT_PROMPT}\n<|assistant|>"
    captions, counts = caption_images(cap, images, tmp_path / "cache", progress=False)
    assert counts["captioned"] == 6
    from datasets_scripts.vcb.cleanup import clean_caption

    for (cid, caption), im in zip(captions.items(), _pil(images)):
        [(raw, _)] = cap.runner.generate([im], [cap.rendered])
        assert caption == clean_caption(raw), cid
    settings = cap.settings()
    assert settings["prompt"] == [{"role": "user", "content": DEFAULT_PROMPT}] and settings["cleaned"] is True
    assert settings["generation"]["max_new_tokens"] == 5 and settings["generation"]["do_sample"] is False
    visual = load_captioner(f"transformers:{models['llava']}?prompt=visualcap&max_new_tokens=3", **CPU)
    assert visual.rendered == "<|user|><image>Briefly describe the content of the image.\n<|assistant|>"
    assert CaptionCache(tmp_path, visual.settings()).key != CaptionCache(tmp_path, settings).key


def test_blip_captions_without_prompt(bench, models, tmp_path):
    """An image-to-text model (BLIP) gets no prompt: its captions are generate(pixel_values) decoded."""
    from transformers import AutoProcessor, BlipForConditionalGeneration

    _, images = bench
    cap = load_captioner(f"transformers:{models['blip']}", max_new_tokens=5, batch_size=3, **CPU)
    assert cap.rendered is None and cap.settings()["prompt"] == [] and cap.settings()["cleaned"] is False
    captions, _ = caption_images(cap, images, tmp_path / "cache", progress=False)
    model = BlipForConditionalGeneration.from_pretrained(models["blip"])
    processor = AutoProcessor.from_pretrained(models["blip"])
    for (cid, caption), im in zip(captions.items(), _pil(images)):
        ids = model.generate(**processor(images=[im], return_tensors="pt"), max_new_tokens=5, num_beams=1)
        assert caption == processor.batch_decode(ids, skip_special_tokens=True)[0].strip(), cid
        assert caption


def test_open_clip_coca_matches_a_hand_written_greedy_loop(bench, models, tmp_path):
    import open_clip

    _, images = bench
    cap = load_captioner(f"open_clip:{models['coca']}?num_beams=1&max_new_tokens=6", **CPU)
    coca, sot, eot = cap.model, 49406, 49407
    bonus = torch.zeros(49408)
    bonus[eot] = 1e4  # the decoder wants to stop at once: only the minimum length keeps it going
    coca.text_decoder.register_forward_hook(lambda module, args, logits: logits + bonus)
    captions, _ = caption_images(cap, images, tmp_path / "cache", progress=False)
    for (cid, caption), im in zip(captions.items(), _pil(images)):
        with torch.no_grad():
            enc = coca(cap.preprocess(im)[None])
            seq = torch.tensor([[sot]])
            for step in range(6):   # greedy, at least 4 new tokens (open_clip's min_seq_len 5 with the start token)
                logits = coca(None, seq, image_latent=enc["image_features"], image_embs=enc["image_embs"],
                              output_labels=False)["logits"][0, -1]
                if step < 4:
                    logits[eot] = -float("inf")
                seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
                if seq[0, -1] == eot:
                    break
        tokens = [t for t in seq[0, 1:].tolist() if t != eot]
        assert len(tokens) == 4 and caption == open_clip.decode(torch.tensor(tokens)).strip(), cid
    assert len(set(captions.values())) > 1  # the images got different captions
    assert cap.settings()["generation"] == {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 4,
                                            "repetition_penalty": 1.0}
    default = load_captioner(f"open_clip:{models['coca']}", **CPU)   # open_clip's decoding defaults
    assert default.settings()["generation"] == {"num_beams": 2, "max_new_tokens": 29, "min_new_tokens": 4,
                                                "repetition_penalty": 1.0}


def test_openai_compatible_server(bench, tmp_path, monkeypatch):
    root, images = bench
    with FakeOpenAIServer() as srv:
        cap = load_captioner(f"openai:{VLM}@{srv.url}?concurrency=2&timeout=10&params=7000000000")
        captions, counts = caption_images(cap, images, tmp_path / "cache", progress=False)
        assert srv.count == 6 and not srv.invalid
        # the VCB clean-up removes the server's chatter: what is left is its answer for this image
        assert captions == {str(c): fake_visual((root / "images" / f"{c}.png").read_bytes()) for c in BENCH_IDS}
        again, counts = caption_images(cap, images, tmp_path / "cache", progress=False)
        assert again == captions and counts["cached"] == 6 and srv.count == 6
        cap.close()
    assert cap.num_parameters() == 7_000_000_000 and cap.settings()["url"] == f"{srv.url}/chat/completions"


def test_model_specs():
    spec = parse_model_spec("open_clip:coca_ViT-L-14@mscoco_finetuned_laion2B-s13B-b90k?num_beams=3")
    assert (spec.kind, spec.name, spec.source, spec.options) == ("open_clip", "coca_ViT-L-14",
                                                                 "mscoco_finetuned_laion2B-s13B-b90k", {"num_beams": 3})
    spec = parse_model_spec("openai:llava-hf/llava-v1.6-34b-hf@http://127.0.0.1:8000/v1?prompt=caption%20it&name=LLaVA")
    assert spec.source == "http://127.0.0.1:8000/v1" and spec.options == {"prompt": "caption it", "name": "LLaVA"}
    assert spec.display_name == "LLaVA"
    assert ModelSpec("clipcap", "/abs/path/ndlb-clipcap/").display_name == "ndlb-clipcap"
    assert parse_model_spec("transformers:google/paligemma-3b-mix-448").display_name == "google/paligemma-3b-mix-448"
    for bad, message in [("llava", "start with one of"), ("vllm:x", "start with one of"),
                         ("openai:llava", "openai:NAME@URL"), ("clipcap:", "no model name"),
                         ("transformers:x?beams=3", "unknown option 'beams'"),
                         ("transformers:x?max_new_tokens=ten", "not a number")]:
        with pytest.raises(ValueError, match=message):
            parse_model_spec(bad)
    with pytest.raises(ValueError, match="option 'num_beams' does not apply to openai"):
        load_captioner("openai:m@http://127.0.0.1:1/v1?num_beams=2")
