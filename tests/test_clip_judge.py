"""The CLIP-scoring core: Eq. 1 and R@1 against hand-computed values, the two judge backends
(transformers and open_clip) giving identical results for identical weights, truncation, and the
on-disk embedding cache."""

import json
import os
import shutil

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from metrics.clip_judge import (
    ClipJudge,
    bag_log_softmax,
    bag_mask,
    bag_recall_at_1,
    clip_s,
    get_judge,
    random_distractors,
    retrieval_scores,
    similarity,
)
from tests import tiny

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
# the tiny open_clip model of tests/tiny.py: widths 32, 2 layers, 2 heads, patch 8 on 32 px, 16-d
TINY_OPEN_CLIP_CFG = {"embed_dim": 16,
                      "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


# ---------------------------------------------------------------------------------------------
# Eq. 1 and R@1 on hand-written similarity matrices
# ---------------------------------------------------------------------------------------------

SIM = torch.tensor([[1.0, 0.0, 0.0],
                    [0.5, 0.5, 0.1]])


def test_eq1_log_softmax_hand_computed():
    lp = bag_log_softmax(SIM)
    # row 0, target 0: 1 - ln(e + 2); row 1, target 1: 0.5 - ln(2 e^0.5 + e^0.1)
    assert lp[0, 0].item() == pytest.approx(-0.5514447139320509, abs=1e-6)
    assert lp[1, 1].item() == pytest.approx(-0.9821983326577104, abs=1e-6)
    log_prob, _ = retrieval_scores(SIM, target=torch.tensor([0, 1]))
    assert log_prob.tolist() == pytest.approx([-0.5514447139320509, -0.9821983326577104], abs=1e-6)
    # temperature divides the similarities: 2 - ln(e^2 + 2)
    assert bag_log_softmax(SIM, scale=2.0)[0, 0].item() == pytest.approx(-0.2395447662218846, abs=1e-6)
    # a mask restricts the softmax to the bag: 1 - ln(e + 1); outside the bag -inf
    mask = torch.tensor([[True, True, False], [True, True, True]])
    lp = bag_log_softmax(SIM, mask)
    assert lp[0, 0].item() == pytest.approx(-0.3132616875182228, abs=1e-6)
    assert lp[0, 2].item() == float("-inf")


def test_recall_at_1_strict_and_ties():
    # row 0: target strictly best -> right; row 1: target ties with column 0 -> wrong
    assert retrieval_scores(SIM, target=torch.tensor([0, 1]))[1].tolist() == [True, False]
    assert bag_recall_at_1(SIM, target=torch.tensor([0, 1])).tolist() == [True, False]
    # the tying image outside the caption's bag no longer counts
    mask = torch.tensor([[True, True, True], [False, True, True]])
    assert bag_recall_at_1(SIM, torch.tensor([0, 1]), mask).tolist() == [True, True]
    # a lower target is wrong, ties with several images are wrong, a bag of one is right
    assert bag_recall_at_1(torch.tensor([[0.2, 0.3], [0.4, 0.4]]), 0).tolist() == [False, False]
    assert bag_recall_at_1(torch.tensor([[0.2, 0.9]]), 0, torch.tensor([[True, False]])).tolist() == [True]
    assert bag_recall_at_1(torch.tensor([[float("nan"), 0.1]]), 0).tolist() == [False]
    # int target = the same column for every row ("target in column 0")
    assert bag_recall_at_1(torch.tensor([[0.9, 0.1], [0.1, 0.9]])).tolist() == [True, False]


def test_retrieval_scores_validates_inputs():
    with pytest.raises(ValueError, match="excludes the target"):
        retrieval_scores(SIM, 0, torch.tensor([[False, True, True], [True, True, True]]))
    with pytest.raises(ValueError, match="target"):
        retrieval_scores(SIM, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="mask has shape"):
        retrieval_scores(SIM, 0, torch.ones(3, 3, dtype=torch.bool))


def test_bag_mask_and_reward_restricted_to_bags():
    # 4 captions x 4 images from two bags (0, 0, 1, 1): with the mask, a caption's softmax only
    # sees its bag-mates, the same as slicing the bag out
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(4, 4, generator=g)
    mask = bag_mask([0, 0, 1, 1], [0, 0, 1, 1])
    assert mask.tolist() == [[True, True, False, False]] * 2 + [[False, False, True, True]] * 2
    lp, ok = retrieval_scores(sim, torch.arange(4), mask)
    lp_a, ok_a = retrieval_scores(sim[:2, :2], torch.arange(2))
    lp_b, ok_b = retrieval_scores(sim[2:, 2:], torch.arange(2))
    assert torch.allclose(lp, torch.cat([lp_a, lp_b]))
    assert ok.tolist() == ok_a.tolist() + ok_b.tolist()


def test_similarity_and_clip_s():
    t = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    i = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    assert similarity(t, i).flatten().tolist() == pytest.approx([0.8, -0.6, 0.0, -1.0], abs=1e-6)
    assert clip_s(torch.tensor([0.31, -0.2])).tolist() == pytest.approx([31.0, 0.0])


def test_random_distractors_protocol():
    c = random_distractors(50, num_distractors=9, seed=0)
    assert c.shape == (50, 10)
    assert (c[:, 0] == np.arange(50)).all()
    for i, row in enumerate(c):
        assert i not in row[1:] and len(set(row[1:])) == 9 and row.min() >= 0 and row.max() < 50
    assert (random_distractors(50, 9, seed=0) == c).all()
    assert not (random_distractors(50, 9, seed=1) == c).all()
    assert random_distractors(100, 99).shape == (100, 100)  # RD100 on 100 images: all others
    with pytest.raises(ValueError, match="at least 100 images"):
        random_distractors(99, 99)


# ---------------------------------------------------------------------------------------------
# the judge: transformers folder, open_clip, truncation, cache
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_judge(tiny_clip_judge_dir):
    return ClipJudge.from_pretrained(str(tiny_clip_judge_dir), device="cpu")


def test_transformers_judge_embeds(hf_judge):
    assert hf_judge.backend == "transformers" and hf_judge.embed_dim == 16 and hf_judge.context_length == 77
    assert hf_judge.device == torch.device("cpu")
    img = hf_judge.embed_images(tiny.random_images(3))
    txt = hf_judge.embed_texts(["a red circle.", "", "two blue squares " * 200])
    for e in (img, txt):
        assert e.dtype == torch.float32 and e.device.type == "cpu"
        assert torch.allclose(e.norm(dim=-1), torch.ones(len(e)), atol=1e-5)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    assert hf_judge.embed_texts([]).shape[0] == 0
    # the GPT-2-style tokenizer adds no eos: the judge appends it (CLIP pools there) and a long
    # caption is truncated to 77 tokens that still end with eos
    ids = hf_judge.tokenize(["a red circle.", "", "two blue squares " * 200])["input_ids"]
    eos = hf_judge._backend.tokenizer.eos_token_id
    assert ids.shape == (3, 77) and ids[2, -1].item() == eos and ids[1, 0].item() == eos
    short = hf_judge._backend.tokenizer("a red circle.")["input_ids"]
    assert ids[0, : len(short) + 1].tolist() == short + [eos]
    # truncation is what the model sees: embedding the long caption == embedding its 77 tokens
    long_caption = "two blue squares " * 200
    prefix = hf_judge._backend.tokenizer.decode(ids[2, :76].tolist())
    assert torch.allclose(hf_judge.embed_texts([long_caption]), hf_judge.embed_texts([prefix]), atol=1e-5)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        hf_judge.embed_texts(["ok", None])


def test_default_device():
    judge = ClipJudge.from_open_clip(tiny.tiny_open_clip(), open_clip.image_transform(32, is_train=False),
                                     open_clip.get_tokenizer("ViT-B-32"), name="tiny")
    assert judge.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_embedding_cache_skips_recomputation(tiny_clip_judge_dir, tmp_path):
    judge = ClipJudge.from_pretrained(str(tiny_clip_judge_dir), device="cpu", batch_size=2, cache_dir=tmp_path)
    calls = []
    encode = judge._backend.encode_images
    judge._backend.encode_images = lambda px: calls.append(len(px)) or encode(px)
    images = tiny.random_images(5)
    first = judge.embed_images(images, ids=[10, 11, 12, 13, 14])
    assert sum(calls) == 5
    calls.clear()
    again = judge.embed_images(images, ids=[10, 11, 12, 13, 14])
    assert calls == [] and torch.equal(first, again)
    # partly cached: only the new id is embedded; order follows the request
    more = judge.embed_images([images[4], images[0], tiny.random_images(1, seed=7)[0]], ids=[14, 10, 99])
    assert calls == [1] and torch.equal(more[:2], first[[4, 0]])
    # a fresh judge of the same name reads the files; no pickle, no partial files
    fresh = ClipJudge.from_pretrained(str(tiny_clip_judge_dir), device="cpu", cache_dir=tmp_path)
    fresh._backend.encode_images = None  # would fail if called
    assert torch.equal(fresh.embed_images(images, ids=[10, 11, 12, 13, 14]), first)
    files = list(tmp_path.rglob("*"))
    assert files and all(f.suffix == ".safetensors" or f.is_dir() for f in files), files
    # another judge does not see these embeddings, nor does the same folder once its weights change
    other = ClipJudge.from_open_clip(tiny.tiny_open_clip(), open_clip.image_transform(32, is_train=False),
                                     open_clip.get_tokenizer("ViT-B-32"), name="another", cache_dir=tmp_path)
    assert other._cache.get(["10"]) == {}
    copy = tmp_path / "judge_copy"
    shutil.copytree(tiny_clip_judge_dir, copy)
    before = ClipJudge.from_pretrained(str(copy), device="cpu", cache_dir=tmp_path / "c2")
    before.embed_images(images[:1], ids=[10])
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "re-saved"
    after = ClipJudge.from_pretrained(str(copy), device="cpu", cache_dir=tmp_path / "c2")
    assert after.name == before.name and after.cache_key != before.cache_key
    assert after._cache.get(["10"]) == {} and before._cache.get(["10"]) != {}


def test_get_judge_memoises_and_passes_through(tiny_clip_judge_dir):
    a = get_judge(str(tiny_clip_judge_dir), device="cpu")
    assert get_judge(str(tiny_clip_judge_dir), device="cpu") is a
    assert get_judge(a) is a
    with pytest.raises(TypeError):
        get_judge(object())


# ---------------------------------------------------------------------------------------------
# transformers and open_clip: identical weights -> identical embeddings and metrics
# ---------------------------------------------------------------------------------------------


def open_clip_to_transformers(oc) -> CLIPModel:
    """The tiny open_clip model as a transformers CLIPModel with the same weights (OpenAI layout)."""
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         eos_token_id=2),  # 2 = legacy CLIP: pool at argmax id (eot), as open_clip
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    sd = oc.state_dict()
    new = {"logit_scale": sd["logit_scale"],
           "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"],
           "text_projection.weight": sd["text_projection"].T,
           "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
           "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
           "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
           "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
           "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
           "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
           "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
           "visual_projection.weight": sd["visual.proj"].T}
    for src, dst in [("transformer", "text_model.encoder"), ("visual.transformer", "vision_model.encoder")]:
        for layer in range(2):
            a, b = f"{src}.resblocks.{layer}", f"{dst}.layers.{layer}"
            for x in ("weight", "bias"):
                q, k, v = sd[f"{a}.attn.in_proj_{x}"].chunk(3)
                new.update({f"{b}.self_attn.q_proj.{x}": q, f"{b}.self_attn.k_proj.{x}": k,
                            f"{b}.self_attn.v_proj.{x}": v,
                            f"{b}.self_attn.out_proj.{x}": sd[f"{a}.attn.out_proj.{x}"],
                            f"{b}.layer_norm1.{x}": sd[f"{a}.ln_1.{x}"], f"{b}.layer_norm2.{x}": sd[f"{a}.ln_2.{x}"],
                            f"{b}.mlp.fc1.{x}": sd[f"{a}.mlp.c_fc.{x}"], f"{b}.mlp.fc2.{x}": sd[f"{a}.mlp.c_proj.{x}"]})
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return model


def clip_tokenizer_from_open_clip() -> CLIPTokenizer:
    """transformers' CLIPTokenizer built from open_clip's bundled BPE (the same OpenAI vocabulary)."""
    t = open_clip.get_tokenizer("ViT-B-32")
    vocab = dict(t.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(t.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def test_transformers_and_open_clip_backends_agree(tiny_open_clip_model):
    oc_judge = ClipJudge.from_open_clip(tiny_open_clip_model, open_clip.image_transform(32, is_train=False),
                                        open_clip.get_tokenizer("ViT-B-32"), name="oc", device="cpu")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=OPENAI_MEAN, image_std=OPENAI_STD)
    hf_judge = ClipJudge.from_transformers(open_clip_to_transformers(tiny_open_clip_model),
                                           clip_tokenizer_from_open_clip(), processor, name="hf", device="cpu")
    captions = ["a red circle on the left.", "Two cats, on a couch...", "", "hello " * 100,
                "A man's \"red\" umbrella - 3.5 m tall!", "a photo"]
    # same token ids up to the padding (transformers pads with eot, open_clip with 0)
    tok = hf_judge.tokenize(captions)
    oc_ids = open_clip.get_tokenizer("ViT-B-32")(captions)
    for row, n in zip(range(len(captions)), tok["attention_mask"].sum(1).tolist()):
        assert tok["input_ids"][row, :n].tolist() == oc_ids[row, :n].tolist() and oc_ids[row, n:].eq(0).all()
    t_hf, t_oc = hf_judge.embed_texts(captions), oc_judge.embed_texts(captions)
    assert torch.allclose(t_hf, t_oc, atol=1e-5), (t_hf - t_oc).abs().max()
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    i_hf, i_oc = hf_judge.embed_images(pixels), oc_judge.embed_images(pixels)
    assert torch.allclose(i_hf, i_oc, atol=1e-5), (i_hf - i_oc).abs().max()
    # from PIL images each backend uses its own preprocessing (same resize/crop/normalise)
    images = tiny.random_images(6, size=32)
    assert torch.allclose(hf_judge.embed_images(images), oc_judge.embed_images(images), atol=1e-4)
    # hence the same Eq. 1 rewards and the same R@1 decisions
    bags = bag_mask([0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1])
    lp_hf, ok_hf = retrieval_scores(similarity(t_hf, i_hf), torch.arange(6), bags)
    lp_oc, ok_oc = retrieval_scores(similarity(t_oc, i_oc), torch.arange(6), bags)
    assert torch.allclose(lp_hf, lp_oc, atol=1e-5) and ok_hf.tolist() == ok_oc.tolist()


def test_open_clip_from_pretrained_local_dir(tiny_open_clip_model, tmp_path):
    """An open_clip folder (open_clip_config.json + safetensors) loads through from_pretrained."""
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CFG,
                                                                "preprocess_cfg": {}}))
    save_file(tiny_open_clip_model.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    judge = ClipJudge.from_pretrained(str(tmp_path), device="cpu")
    assert judge.backend == "open_clip" and judge.embed_dim == 16 and judge.name == f"open_clip:{tmp_path}"
    ref = ClipJudge.from_open_clip(tiny_open_clip_model, open_clip.image_transform(32, is_train=False),
                                   open_clip.get_tokenizer("ViT-B-32"), name="ref", device="cpu")
    images, texts = tiny.random_images(2, size=32), ["a red star", "x " * 300]
    assert torch.allclose(judge.embed_images(images), ref.embed_images(images), atol=1e-6)
    assert torch.allclose(judge.embed_texts(texts), ref.embed_texts(texts), atol=1e-6)


def test_backend_auto_detection():
    from metrics.clip_judge import _looks_open_clip

    assert _looks_open_clip("ViT-B-32", None) and _looks_open_clip("hf-hub:org/repo", None)
    assert _looks_open_clip("anything", "openai")
    assert not _looks_open_clip("openai/clip-vit-base-patch32", None)
    with pytest.raises(ValueError, match="backend"):
        ClipJudge.from_pretrained("x", backend="jax")
