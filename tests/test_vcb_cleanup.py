"""Clean-up of LLM/VLM outputs: a table of real-looking model answers, the caption
each should become, and the flags it should get (flagged outputs are kept, not dropped)."""

from __future__ import annotations

import pytest

from datasets_scripts.vcb import (EchoBackend, StageSettings, caption_flags, clean_caption, load_prompt, load_split,
                                  read_records, run_stage)
from datasets_scripts.vcb.backends import GenResult
from tests.test_vcb_support import make_coco

#: (raw model output, expected cleaned caption, expected flags)
CASES = [
    ("A man riding a wave on top of a surfboard.", "A man riding a wave on top of a surfboard.", []),
    ("Sure! Here is the caption:\n\nA white and brown plate with steak, carrots and fried potatoes.",
     "A white and brown plate with steak, carrots and fried potatoes.", []),
    ("Sure, here's a holistic caption that incorporates all the information: A wooden bench sits atop a hill.",
     "A wooden bench sits atop a hill.", []),
    ("Caption: A bathroom with a toilet next to a white sink.", "A bathroom with a toilet next to a white sink.", []),
    ("Holistic caption: \"A young boy wearing a red shirt poses next to a graffiti-covered wall.\"",
     "A young boy wearing a red shirt poses next to a graffiti-covered wall.", []),
    ("\"A herd of zebras grazing near a watering hole.\"", "A herd of zebras grazing near a watering hole.", []),
    ("“A cat sleeping on a red couch.”", "A cat sleeping on a red couch.", []),
    ("[INST] A dog catching a frisbee in a park. [/INST]", "A dog catching a frisbee in a park.", []),
    ("[/INST] A dog catching a frisbee in a park.", "A dog catching a frisbee in a park.", []),
    ("Assistant: A plate of food on a wooden table.", "A plate of food on a wooden table.", []),
    ("<|im_start|>assistant\nA red double decker bus on a city street.<|im_end|>",
     "A red double decker bus on a city street.", []),
    ("A red bus driving down a street.</s>", "A red bus driving down a street.", []),
    ("A man in a white shirt plays tennis on a purple court.\n\nNote: I ignored the woman mentioned in the new caption "
     "because it conflicts with the correct caption.", "A man in a white shirt plays tennis on a purple court.", []),
    ("A giraffe standing next to a tree. (Note: the color of the tree is not mentioned.)",
     "A giraffe standing next to a tree.", []),
    ("A kitchen with a stove, a sink and wooden cabinets. I hope this helps!",
     "A kitchen with a stove, a sink and wooden cabinets.", []),
    ("A kitchen with a stove and a sink.\n\nA second version: a kitchen with white cabinets.",
     "A kitchen with a stove and a sink.", []),
    ("**Caption:** A group of people flying kites on a beach.", "A group of people flying kites on a beach.", []),
    ("## Improved caption\nA group of people flying kites on a sunny beach.",
     "A group of people flying kites on a sunny beach.", []),
    ("- A train pulling into a station next to a platform.", "A train pulling into a station next to a platform.", []),
    ("Certainly! A small boat docked on a calm lake at sunset.", "A small boat docked on a calm lake at sunset.", []),
    ("A snowboarder jumps over a ramp. This caption combines the details of all five references.",
     "A snowboarder jumps over a ramp.", []),
    ("A woman holding an umbrella in the rain.\nUser: Reference caption 1: A man on a bike.",
     "A woman holding an umbrella in the rain.", []),
    ("A pizza with cheese and tomatoes.\n\nReference caption 1: A plate of food.", "A pizza with cheese and tomatoes.", []),
    ("In this image, a man is standing next to a horse in a field. The horse is brown and the man is wearing a hat.",
     "In this image, a man is standing next to a horse in a field. The horse is brown and the man is wearing a hat.", []),
    ("A man's \"Stop\" sign on a street corner.", "A man's \"Stop\" sign on a street corner.", []),
    ("", "", ["empty"]),
    ("   \n\n  ", "", ["empty"]),
    ("Sure! Here is the caption:", "", ["empty"]),
    ("A dog.", "A dog.", ["too_short"]),
    ("I'm sorry, but I cannot see the image you are referring to.",
     "I'm sorry, but I cannot see the image you are referring to.", ["refusal"]),
    ("I am unable to provide a caption without more information about the image.",
     "I am unable to provide a caption without more information about the image.", ["refusal"]),
    ("a cat on a bed on a bed on a bed on a bed", "a cat on a bed on a bed on a bed on a bed", ["repetitive"]),
    ("The the the the the dog is running.", "The the the the the dog is running.", ["repetitive"]),
    ("A man and a woman sit at a table with a cake, a man and a woman sit at a table with a cake, a man and a woman sit",
     "A man and a woman sit at a table with a cake, a man and a woman sit at a table with a cake, a man and a woman sit",
     ["repetitive"]),
    ("Okay, here is the blended caption:\n\"A living room with a couch, a television and a lamp.\"\n\nLet me know if you need anything else.",
     "A living room with a couch, a television and a lamp.", []),
    ("Here's the improved caption:\n\n1. A clock tower in the middle of a city square.",
     "A clock tower in the middle of a city square.", []),
]


@pytest.mark.parametrize("raw,expected,flags", CASES, ids=[f"case{i:02d}" for i in range(len(CASES))])
def test_clean_and_flag_table(raw, expected, flags):
    cleaned = clean_caption(raw)
    assert cleaned == expected
    assert caption_flags(cleaned) == flags
    assert clean_caption(cleaned) == cleaned          # idempotent


def test_flags_for_truncation_and_word_threshold():
    assert caption_flags("A man riding a horse on a beach", finish_reason="length") == ["truncated"]
    assert caption_flags("A man riding a horse.", finish_reason="stop") == []
    assert caption_flags("A man riding.", min_words=4) == ["too_short"]
    assert caption_flags("Two dogs.", min_words=2) == []
    assert clean_caption(None) == ""


def test_pipeline_counts_flags_and_keeps_flagged_records(tmp_path):
    """Flagged outputs are written (not dropped) and counted in the report."""
    data = load_split(make_coco(tmp_path, {"train": [1, 2, 3, 4]}), "train")
    answers = {1: "Sure! Here is the caption: A red circle on the left.", 2: "", 3: "I'm sorry, I can't help with that.",
               4: "a dog a dog a dog a dog a dog"}

    class Scripted(EchoBackend):
        def generate(self, requests):
            return [GenResult(r.cocoid, answers[r.cocoid], "length" if r.cocoid == 4 else "stop") for r in requests]

    rep = run_stage("blendcap", data, tmp_path / "out", Scripted(), load_prompt("blendcap"), StageSettings(progress=False))
    assert rep.new == 4 and rep.flagged == 3
    assert rep.flag_counts == {"empty": 1, "refusal": 1, "repetitive": 1, "truncated": 1}
    recs = read_records(tmp_path / "out" / "blendcap")
    assert recs[1]["text"] == "A red circle on the left." and recs[1]["flags"] == []
    assert recs[2]["flags"] == ["empty"] and recs[3]["flags"] == ["refusal"]
    assert recs[4]["raw"] == answers[4] and recs[4]["flags"] == ["repetitive", "truncated"]
