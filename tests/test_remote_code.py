"""Remote code (issue 16.5): `auto_map` is defined once (``modeling_clipcap.AUTO_MAP``), covers every
Auto class the package registers, is what a plain ``save_pretrained`` and ``upload_model.py``
(``publishing.model_staging``) write, and every one of those Auto classes (plus AutoTokenizer, AutoImageProcessor and the "image-to-text"
pipeline) loads a saved tiny model in a fresh process that cannot import this repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from modeling_clipcap import AUTO_MAP, ClipCapConfig, ClipCapForCaptioning, ClipCapProcessor
from publishing.model_staging import save_model_folder
from tests import tiny

CLASSES = {"ClipCapConfig": ClipCapConfig, "ClipCapForCaptioning": ClipCapForCaptioning,
           "ClipCapProcessor": ClipCapProcessor}


def registered_auto_classes() -> dict[str, type]:
    """{Auto class name: our class} for every transformers Auto class that knows ClipCap in this process."""
    out = {}
    for name in dir(transformers):
        if not name.startswith("Auto"):
            continue
        auto = getattr(transformers, name)
        if name == "AutoConfig":
            if "clipcap" in CONFIG_MAPPING:
                out[name] = CONFIG_MAPPING["clipcap"]
        elif name == "AutoProcessor":
            if ClipCapConfig in PROCESSOR_MAPPING:
                out[name] = PROCESSOR_MAPPING[ClipCapConfig]
        elif hasattr(auto, "_model_mapping"):
            try:
                out[name] = auto._model_mapping[ClipCapConfig]
            except KeyError:
                pass
    return out


def test_auto_map_is_the_in_repo_registration():
    registered = registered_auto_classes()
    assert set(registered) == set(AUTO_MAP) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText",
                                                  "AutoProcessor"}
    for auto_name, reference in AUTO_MAP.items():
        file, cls_name = reference.split(".")
        cls = CLASSES[cls_name]
        assert registered[auto_name] is cls, auto_name
        assert cls.__module__ == f"modeling_clipcap.{file}", reference  # the file the class is saved in


def test_plain_save_pretrained_writes_what_an_upload_writes(tiny_clipcap_dir, tokenizer, tmp_path):
    plain = json.loads((tiny_clipcap_dir / "config.json").read_text())
    assert plain["auto_map"] == AUTO_MAP
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    save_model_folder(model, processor, tmp_path)
    staged = json.loads((tmp_path / "config.json").read_text())
    assert staged == plain
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((tiny_clipcap_dir / name).read_text())
    assert json.loads((tmp_path / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": AUTO_MAP["AutoProcessor"]}


def test_the_model_leaves_its_config_alone_and_a_save_writes_the_entries(tokenizer, tmp_path):
    model, _ = tiny.build_tiny_clipcap(tokenizer)
    assert getattr(model.config, "auto_map", None) is None
    assert getattr(model.config, "custom_pipelines", None) is None
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP and set(saved["custom_pipelines"]) == {"image-to-text"}
    assert (tmp_path / "pipeline_clipcap.py").is_file()


def run_without_the_repository(script: str, args: list, tmp_path) -> dict:
    """Run `script` in a fresh offline Python process that cannot import this repository (no
    PYTHONPATH, working directory `tmp_path`, its own remote-code module cache); return the JSON it
    writes to out.json."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


FRESH = """
import json, sys, torch, transformers
from transformers import pipeline
from PIL import Image
folder, pixels, image = sys.argv[1], sys.argv[2], sys.argv[3]
auto_map = json.load(open(folder + "/config.json"))["auto_map"]
pixel_values = torch.load(pixels, weights_only=True)
out = {"loaded": {}, "refused": {}}
for name in [*auto_map, "AutoTokenizer", "AutoImageProcessor"]:
    auto = getattr(transformers, name)
    obj = auto.from_pretrained(folder, trust_remote_code=True)
    out["loaded"][name] = [type(obj).__module__.split(".")[0], type(obj).__name__]
    if hasattr(obj, "generate"):
        out["loaded"][name].append(obj.eval()(pixel_values=pixel_values, input_ids=torch.tensor([[5, 6, 7]])
                                              ).logits[:, -1, :8].tolist())
        out["loaded"][name].append(obj.generate(pixel_values=pixel_values, max_new_tokens=8).tolist())
    if name in auto_map:
        try:
            auto.from_pretrained(folder)
            out["refused"][name] = False
        except ValueError as err:
            out["refused"][name] = "trust_remote_code" in str(err)
captioner = pipeline("image-to-text", model=folder, trust_remote_code=True, max_new_tokens=8)
out["pipeline"] = [type(captioner).__name__, captioner(Image.open(image))[0]["generated_text"]]
out["repo_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("modeling_clipcap", "tests"))
open("out.json", "w").write(json.dumps(out))  # stdout also holds the refusals' prompts
"""


def test_every_auto_class_loads_in_a_fresh_process(tiny_clipcap_dir, tokenizer, tmp_path):
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    image = tiny.random_images(1, seed=5)[0]
    image.save(tmp_path / "image.png")
    pixel_values = processor(images=image)["pixel_values"]
    torch.save(pixel_values, tmp_path / "pixels.pt")
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=torch.tensor([[5, 6, 7]])).logits[:, -1, :8]
        ids = model.generate(pixel_values=pixel_values, max_new_tokens=8)
    out = run_without_the_repository(FRESH, [tiny_clipcap_dir, tmp_path / "pixels.pt", tmp_path / "image.png"], tmp_path)
    assert out["repo_imported"] == []
    loaded = out["loaded"]
    assert set(loaded) == set(AUTO_MAP) | {"AutoTokenizer", "AutoImageProcessor"}
    for name, reference in AUTO_MAP.items():  # our classes, from the folder's code files
        assert loaded[name][:2] == ["transformers_modules", reference.split(".")[1]], name
        assert out["refused"][name] is True, f"{name} loaded remote code without trust_remote_code=True"
    for name in ("AutoModel", "AutoModelForImageTextToText"):  # the same weights and captions
        torch.testing.assert_close(torch.tensor(loaded[name][2]), logits)
        assert loaded[name][3] == ids.tolist()
    assert loaded["AutoTokenizer"] == ["transformers", type(processor.tokenizer).__name__]
    assert loaded["AutoImageProcessor"] == ["transformers", type(processor.image_processor).__name__]
    assert out["pipeline"] == ["ClipCapCaptioningPipeline", processor.batch_decode(ids)[0]]


RESAVE = """
import json, os, sys
from transformers import AutoModel, AutoProcessor, pipeline
from PIL import Image
folder, new, image = sys.argv[1], sys.argv[2], sys.argv[3]
AutoModel.from_pretrained(folder, trust_remote_code=True).save_pretrained(new)  # the model alone
files = sorted(os.listdir(new))
AutoProcessor.from_pretrained(folder, trust_remote_code=True).save_pretrained(new)
captioner = pipeline("image-to-text", model=new, trust_remote_code=True, max_new_tokens=8)
out = {"files": files, "caption": captioner(Image.open(image))[0]["generated_text"],
       "repo_imported": sorted(m for m in sys.modules if m.split(".")[0] in ("modeling_clipcap", "tests"))}
open("out.json", "w").write(json.dumps(out))
"""


def test_a_model_loaded_as_remote_code_and_saved_again_keeps_its_pipeline(tiny_clipcap_dir, tmp_path):
    """A process that cannot import this repository loads the model as remote code and saves it with
    ``model.save_pretrained`` alone: the folder still has the pipeline's code (and what it imports),
    and the pipeline loads from it and captions as the original folder's does."""
    from transformers import pipeline

    image = tiny.random_images(1, seed=7)[0]
    image.save(tmp_path / "image.png")
    expected = pipeline("image-to-text", model=str(tiny_clipcap_dir), trust_remote_code=True,
                        max_new_tokens=8)(image)[0]["generated_text"]
    out = run_without_the_repository(RESAVE, [tiny_clipcap_dir, tmp_path / "resaved", tmp_path / "image.png"], tmp_path)
    assert out["repo_imported"] == []
    assert {"pipeline_clipcap.py", "image_loading.py", "modeling_clipcap.py", "config.json"} <= set(out["files"])
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert set(saved["custom_pipelines"]) == {"image-to-text"} and saved["auto_map"] == AUTO_MAP
    assert out["caption"] == expected
