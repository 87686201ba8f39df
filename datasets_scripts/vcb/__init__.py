"""Visual Caption Boost: BlendCap, VisualCap and HolisticCap captions for COCO (paper Sec. 2, App. A).

Python API (the CLI is ``python -m datasets_scripts.vcb run|export --help``)::

    from datasets_scripts.vcb import load_split, load_prompt, make_backend, run_stage, export_holisticcap

    data = load_split("coco_hf", "train")
    llm = make_backend("openai", "mistralai/Mistral-7B-Instruct-v0.2", base_url="http://127.0.0.1:8000/v1")
    run_stage("blendcap", data, "vcb_out", llm, load_prompt("blendcap"))
    export_holisticcap("vcb_out", "coco_hf", "holisticcap_dataset")
"""

from .backends import Backend, EchoBackend, GenRequest, GenResult, merge_system
from .cleanup import FLAGS, caption_flags, clean_caption
from .data import CocoSplit, load_dataset_dict, load_split, parse_ids, parse_shard, select_ids
from .export import caption_length_stats, export_holisticcap, length_table
from .pipeline import StageReport, StageSettings, VCBError, mark_killed_runs, run_stage, stage_records
from .prompts import DEFAULT_PROMPTS_DIR, STAGES, PromptTemplate, load_prompt, load_prompts
from .registry import BACKENDS, make_backend
from .store import ShardStore, read_records

__all__ = [
    "STAGES", "FLAGS", "DEFAULT_PROMPTS_DIR", "PromptTemplate", "load_prompt", "load_prompts",
    "Backend", "EchoBackend", "GenRequest", "GenResult", "BACKENDS", "make_backend", "merge_system",
    "clean_caption", "caption_flags", "CocoSplit", "load_dataset_dict", "load_split", "parse_ids", "parse_shard",
    "select_ids", "ShardStore", "read_records", "StageReport", "StageSettings", "VCBError", "mark_killed_runs", "run_stage",
    "stage_records",
    "export_holisticcap", "caption_length_stats", "length_table",
]
