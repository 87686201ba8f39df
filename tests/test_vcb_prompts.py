"""Prompt templates of VCB (paper App. A.1): the shipped files hold the paper's prompts and
in-context examples, render to the expected chat layout, and hash by content."""

from __future__ import annotations

import shutil

import pytest

from datasets_scripts.vcb import DEFAULT_PROMPTS_DIR, STAGES, load_prompt, load_prompts, merge_system

PAPER_SYSTEM_STARTS = {
    "blendcap": "You are given a reference set of 5 image captions. Create a holistic caption to describe the same "
                "image by incorporating relevant information from all the reference captions.",
    "holisticcap": "In this task, your objective is to improve “Correct caption” by incorporating any additional "
                   "information present in “New caption”.",
}
PAPER_SYSTEM_ENDS = {
    "blendcap": "Stop after the first period and do not ask any additional questions. Just complete the text. "
                "Three examples are shown below :",
    "holisticcap": "Refrain from seeking further clarification and explanations; simply generate the caption. "
                   "Three examples are shown below :",
}


def test_shipped_prompts_are_the_papers():
    p = load_prompts()
    for stage in ("blendcap", "holisticcap"):
        assert p[stage].system.startswith(PAPER_SYSTEM_STARTS[stage])
        assert p[stage].system.endswith(PAPER_SYSTEM_ENDS[stage])
        assert len(p[stage].examples) == 3
    assert p["visualcap"].system is None and p["visualcap"].render_user() == "Briefly describe the content of the image."
    assert p["blendcap"].examples[2]["output"] == "A bathroom with a toilet next to a white sink, mirror and toilet roll."
    assert p["holisticcap"].examples[1]["output"] == ("A white fire hydrant sits in front of an old couch on a sidewalk "
                                                      "in front of a brick house.")


def test_blendcap_messages_layout():
    tpl = load_prompt("blendcap")
    caps = [f"caption {i}." for i in range(7)]           # COCO has 5+ captions; the prompt uses 5
    msgs = tpl.messages(captions=caps)
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert msgs[-1]["content"] == "\n".join(f"Reference caption {i + 1}: caption {i}." for i in range(5))
    assert msgs[1]["content"].splitlines()[3] == "Reference caption 4: A plate with some steak, carrots, and sliced fried potatoes."
    assert msgs[2]["content"] == ("A white and brown plate on a table with an assortment of steak, carrots, sliced "
                                  "fried potatoes, and vegetables.")
    merged = tpl.messages("merge", captions=caps)
    assert [m["role"] for m in merged] == ["user", "assistant"] * 3 + ["user"]
    assert merged[0]["content"] == f"{msgs[0]['content']}\n\n{msgs[1]['content']}"
    assert merge_system(msgs) == merged


def test_holisticcap_messages_layout():
    msgs = load_prompt("holisticcap").messages(blendcap="A dog on grass.", visualcap="In this image, a brown dog.")
    assert len(msgs) == 8
    assert msgs[-1]["content"] == "Correct caption: A dog on grass.\nNew noisy caption: In this image, a brown dog."
    assert msgs[5]["content"].startswith("Correct caption: A young boy poses next to a wall with writing on it")


def test_hash_follows_content_not_layout(tmp_path):
    for s in STAGES:
        shutil.copy(DEFAULT_PROMPTS_DIR / f"{s}.yaml", tmp_path / f"{s}.yaml")
    path = tmp_path / "blendcap.yaml"
    base = load_prompt("blendcap").sha256
    path.write_text("# an extra comment\n" + path.read_text())
    assert load_prompt("blendcap", tmp_path).sha256 == base
    path.write_text(path.read_text().replace("Three examples", "3 examples"))
    changed = load_prompt("blendcap", tmp_path)
    assert changed.sha256 != base and "3 examples are shown" in changed.system
    assert len(base) == 64 and load_prompt("visualcap", tmp_path).sha256 == load_prompt("visualcap").sha256


def test_template_errors_name_the_file(tmp_path):
    (tmp_path / "blendcap.yaml").write_text("stage: blendcap\nsystem: s\nuser_template: '{{ captionz }}'\n"
                                            "examples:\n  - captions: [a]\n    output: b\n")
    with pytest.raises(ValueError, match=r"blendcap.yaml: example 0 does not render.*captionz"):
        load_prompt("blendcap", tmp_path)
    (tmp_path / "holisticcap.yaml").write_text("stage: blendcap\nuser_template: x\n")
    with pytest.raises(ValueError, match="declares stage 'blendcap'"):
        load_prompt("holisticcap", tmp_path)
    with pytest.raises(FileNotFoundError, match="visualcap.yaml"):
        load_prompt("visualcap", tmp_path)
