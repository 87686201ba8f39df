"""The shared tiny fixtures really are what the other tests assume."""

import torch
from transformers import AutoTokenizer, CLIPModel


def test_tokenizer_round_trip(tokenizer):
    ids = tokenizer("a red circle on the left.").input_ids
    assert tokenizer.decode(ids) == "a red circle on the left."
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0


def test_tiny_clip_judge_folder_loads(tiny_clip_judge_dir):
    model = CLIPModel.from_pretrained(tiny_clip_judge_dir)
    tok = AutoTokenizer.from_pretrained(tiny_clip_judge_dir)
    batch = tok(["a red circle.", "two blue squares on the right."], padding=True, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(**batch)
        img = model.get_image_features(pixel_values=torch.randn(2, 3, 32, 32))
    text = getattr(text, "pooler_output", text)
    img = getattr(img, "pooler_output", img)
    assert text.shape == (2, 16) and img.shape == (2, 16)
