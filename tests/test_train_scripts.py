"""train_mle.py and train_sr.py end to end; SR under `accelerate launch` with 2 CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModel, AutoProcessor

from tests import tiny
from trainers import CaptionCollator, CaptionPairs

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_2_CPU = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def accelerate_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco")
    datasets.DatasetDict({"train": tiny.caption_dataset(24), "val": tiny.caption_dataset(9, seed=1, first_id=5000)}
                         ).save_to_disk(folder)
    return folder


def mean_loss(model, processor, data):
    pairs = CaptionPairs(data)
    batch = CaptionCollator(processor)([pairs[i] for i in range(len(pairs))])
    with torch.no_grad():
        return model(**batch).loss.item()


def test_train_mle_lowers_the_loss_and_saves_an_auto_model(tmp_path, coco_dir, tiny_clipcap_dir):
    import train_mle

    data = datasets.load_from_disk(coco_dir)["train"]
    model = AutoModel.from_pretrained(tiny_clipcap_dir)
    processor = AutoProcessor.from_pretrained(tiny_clipcap_dir)
    before = mean_loss(model, processor, data)
    out = tmp_path / "mle"
    metrics = train_mle.main(["--dataset", str(coco_dir), "--model", str(tiny_clipcap_dir), "--output_dir", str(out),
                              "--max_steps", "40", "--learning_rate", "5e-3", "--warmup_steps", "0",
                              "--per_device_train_batch_size", "16", "--report_to", "none", "--save_strategy", "no",
                              "--use_cpu", "--logging_steps", "10", "--eval_split", "val"])
    trained = AutoModel.from_pretrained(out, trust_remote_code=True)
    after = mean_loss(trained, processor, data)
    assert after < 0.6 * before, (before, after)
    assert "eval_loss" in metrics and metrics["train_loss"] > 0
    assert (out / "modeling_clipcap.py").is_file() and (out / "processor_config.json").is_file()


def test_bags_stay_whole_across_two_processes_and_accumulation(tmp_path):
    run = subprocess.run([sys.executable, *ACCELERATE_2_CPU, str(ROOT / "tests" / "sr_ddp_script.py"), str(tmp_path)],
                         cwd=ROOT, env=accelerate_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    done = [json.loads((tmp_path / f"done{r}.json").read_text()) for r in (0, 1)]
    assert all(d["world_size"] == 2 and d["distributed_type"] == "DistributedType.MULTI_CPU" for d in done)
    records = [json.loads(line) for r in (0, 1) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()]
    assert {r["rank"] for r in records} == {0, 1}
    # 8 bags of 3 -> 8 micro-batches of 1 bag; 2 ranks x 2 accumulation steps = 4 micro-batches per update
    assert len(records) == 8 and done[0]["global_step"] == 2
    bags = {tuple(range(1000 + i, 1003 + i)) for i in range(0, 24, 3)}
    seen = []
    for record in records:
        groups = {}
        for cocoid, bag in zip(record["cocoid"], record["bag_id"]):
            groups.setdefault(bag, []).append(cocoid)
        assert all(tuple(sorted(g)) in bags for g in groups.values()), record  # whole bags only
        seen += [tuple(sorted(g)) for g in groups.values()]
    assert sorted(seen) == sorted(bags)  # every bag exactly once per epoch, over both ranks
    assert done[0]["baseline"] == done[1]["baseline"]  # the running baseline is synchronised


def test_accelerate_launch_train_sr_end_to_end_on_two_processes(tmp_path, coco_dir, tiny_clipcap_dir,
                                                                tiny_clip_judge_dir):
    bags = {"bag_size": 3, "cocoids": [list(range(1000 + i, 1003 + i)) for i in range(0, 24, 3)]}
    (tmp_path / "bags3.json").write_text(json.dumps(bags))
    (tmp_path / "val3.json").write_text(json.dumps({"bag_size": 3, "cocoids": [[5000, 5001, 5002], [5003, 5004, 5005]]}))
    out = tmp_path / "sr"
    args = ["train_sr.py", "--model", tiny_clipcap_dir, "--dataset", coco_dir, "--bags", tmp_path / "bags3.json",
            "--bag_schedule", "0,3", "--judge", tiny_clip_judge_dir, "--rewards", "sr", "cider",
            "--reward_weights", "1", "0.5", "--per_device_train_batch_size", "6", "--num_train_epochs", "2",
            "--max_new_tokens", "5", "--learning_rate", "1e-3", "--lora_modules", "LV", "--lora_rank", "4",
            "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--output_dir", out,
            "--eval_num_beams", "2",
            "--eval_split", "val", "--eval_bags", tmp_path / "val3.json", "--eval_strategy", "epoch", "--use_cpu"]
    run = subprocess.run([sys.executable, *ACCELERATE_2_CPU, *map(str, args)], cwd=ROOT, env=accelerate_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    # 24 images / 6 per batch = 4 batches per epoch; two ranks share them: 2 steps per epoch, not 4
    assert state["global_step"] == 4
    logs = [h for h in state["log_history"] if "reward" in h]
    assert [h["bags/size"] for h in logs] == [0.0, 0.0, 3.0, 3.0]
    assert all("rewards/cider/mean" in h and "rewards/self_retrieval/mean" in h for h in logs)
    evals = [h for h in state["log_history"] if "eval_r1_bags" in h]
    assert len(evals) == 2 and all(0 <= h["eval_r1_bags"] <= 100 and 0 <= h["eval_r1_random"] <= 100 for h in evals)
    model = AutoModel.from_pretrained(out, trust_remote_code=True)  # LoRA merged: a plain ClipCap
    assert type(model).__name__ == "ClipCapForCaptioning"
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_holisticcap_export_joins_onto_the_image_dataset(tmp_path, coco_dir, tokenizer):
    """The VCB export (captions only) joins onto the COCO images by cocoid for MLE/SR training."""
    from datasets_scripts.vcb.__main__ import main as vcb
    from trainers import join_caption_columns

    assert vcb(["run", "--dataset", str(coco_dir), "--split", "train", "--out", str(tmp_path / "vcb"),
                "--backend", "echo", "--limit", "20"]) == 0
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert vcb(["export", "--run-dir", str(tmp_path / "vcb"), "--dataset", str(coco_dir), "--allow-partial",
                "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(tmp_path / "holistic")]) == 0
    images = datasets.load_from_disk(coco_dir)["train"]
    from datasets_scripts.coco import load_caption_source

    joined = join_caption_columns(images, load_caption_source(tmp_path / "holistic"))
    exported = {r["cocoid"]: r["holisticcap"] for r in
                datasets.load_dataset("parquet", data_files=sorted(map(str, (tmp_path / "holistic").rglob("*.parquet"))),
                                      split="train")}
    assert len(exported) == 20
    for row in joined:
        assert row["holisticcap"] == exported.get(row["cocoid"])  # None for the 4 images left out
    assert len(CaptionPairs(joined, "holisticcap")) == sum(1 for v in exported.values() if v)
