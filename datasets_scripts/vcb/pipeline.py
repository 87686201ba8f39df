"""The three Visual Caption Boost stages at COCO scale (paper Sec. 2, App. A.1).

- BlendCap: an instruction LLM blends an image's human captions (few-shot);
- VisualCap: a VLM answers "Briefly describe the content of the image.";
- HolisticCap: the LLM instils VisualCap's details into BlendCap, preferring BlendCap on
  conflicts (few-shot); it needs both outputs for the same COCO id.

:func:`run_stage` runs one stage over one split, resumable: outputs go to
``<run_dir>/<stage>/shards/*.jsonl`` through :class:`~.store.ShardStore` (ids already there
are skipped), each record carries its provenance (model, backend, prompt hash, run id, flags,
raw output) and each run writes ``<run_dir>/<stage>/runs/<run_id>.json`` with the generation
settings, the prompt, the counts and the throughput. The manifest is rewritten after every shard
file, so a run killed without warning (SIGKILL, power loss) leaves the counts and retries of what
it wrote, with status ``running``; the next run in the folder marks such a manifest ``killed``
when its process (same host, ``pid``) is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common import write_json

from .backends import Backend, GenRequest, GenResult
from .cleanup import caption_flags, clean_caption
from .data import CocoSplit, select_ids
from .prompts import STAGES, PromptTemplate
from .store import ShardStore, read_records

__all__ = ["StageReport", "StageSettings", "VCBError", "mark_killed_runs", "run_stage", "stage_records"]

logger = logging.getLogger(__name__)


class VCBError(RuntimeError):
    """A stage cannot go on (failed model call, mixed provenance, missing inputs ...)."""


@dataclass
class StageSettings:
    """How :func:`run_stage` runs a stage: which ids, how it saves, what it does on errors.

    Args:
        ids, limit, shard: the selection (:func:`~.data.select_ids`): explicit ids (None: all),
            at most ``limit`` of them, shard ``(i, n)`` of them.
        shard_size, flush_every_s: records per shard file and the longest wait before a buffered
            record is written (:class:`~.store.ShardStore`).
        system_mode: "auto"/"system" send a system message, "merge" puts it in the first user turn.
        on_error: "raise" stops at the first failed call (after saving the chunk's other results);
            "skip" leaves failed ids unwritten (a rerun retries them) and lists them in the report.
        allow_mixed_provenance: add to a folder whose records came from another model or prompt.
        min_words: fewer words flags a caption "too_short".
        progress: show a tqdm bar (rate and ETA).
        manifest_extra: more fields for the run manifest (e.g. the CLI arguments).
    """

    ids: list[int] | None = None
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    shard_size: int = 256
    flush_every_s: float = 60.0
    system_mode: str = "auto"
    on_error: str = "raise"
    allow_mixed_provenance: bool = False
    min_words: int = 3
    progress: bool = True
    manifest_extra: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")


@dataclass
class StageReport:
    """What one :func:`run_stage` call did (also written to its run manifest)."""

    stage: str
    run_id: str
    model: str
    backend: str
    selected: int = 0
    done_before: int = 0
    new: int = 0
    written: int = 0
    flagged: int = 0
    flag_counts: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    failed_ids: list[int] = field(default_factory=list)
    missing_inputs: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    captions_per_s: float = 0.0
    status: str = "running"

    def summary(self) -> str:
        """One human-readable line."""
        flags = ", ".join(f"{k} {v}" for k, v in sorted(self.flag_counts.items())) or "none"
        retries = ", ".join(f"{k} {v}" for k, v in sorted(self.retries.items())) or "none"
        return (f"{self.stage}: {self.new} new, {self.done_before} already done, {self.selected} selected; "
                f"flagged {self.flagged} ({flags}); failed {self.failed}; missing inputs {self.missing_inputs}; "
                f"retries {sum(self.retries.values())} ({retries}); {self.seconds:.1f} s, "
                f"{self.captions_per_s:.2f} captions/s [{self.status}]")


def stage_records(run_dir: str | Path, stage: str) -> dict[int, dict]:
    """The finished records of one stage of a run folder, by COCO id."""
    return read_records(Path(run_dir) / stage)


def _check_provenance(done: dict[int, dict], backend: Backend, template: PromptTemplate, stage_dir: Path) -> None:
    models = Counter(r.get("model") for r in done.values())
    hashes = Counter(r.get("prompt_sha256") for r in done.values())
    other_models = {m: n for m, n in models.items() if m != backend.model}
    other_hashes = {h: n for h, n in hashes.items() if h != template.sha256}
    if other_models or other_hashes:
        raise VCBError(
            f"{stage_dir} already holds records made with another model {other_models or ''} or prompt "
            f"{ {h[:12] if h else h: n for h, n in other_hashes.items()} or ''} than this run's "
            f"({backend.model!r}, prompt {template.sha256[:12]}). Use another --out folder, or pass "
            "--allow-mixed-provenance to add to it (each record keeps its own model and prompt hash).")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def mark_killed_runs(stage_dir: Path) -> list[str]:
    """Mark the manifests of runs that died without a final report (status ``running``, same host,
    process gone) as ``killed``; returns their run ids. Their counts are those of their last shard."""
    killed = []
    for path in sorted((stage_dir / "runs").glob("*.json")):
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        pid = manifest.get("pid")
        if (manifest.get("status") != "running" or manifest.get("host") != platform.node()
                or not isinstance(pid, int) or pid == os.getpid() or _process_alive(pid)):
            continue
        manifest["status"] = manifest["report"]["status"] = "killed"
        manifest["killed_noticed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(path, manifest)
        killed.append(manifest.get("run_id", path.stem))
    if killed:
        logger.warning("%s: %d earlier run(s) ended without a final report (killed): %s; their manifests "
                       "count what they had written", stage_dir.name, len(killed), ", ".join(killed))
    return killed


def _versions() -> dict[str, str]:
    """Versions of the libraries in use (only those already imported: no import cost)."""
    import sys

    out = {"python": platform.python_version()}
    for mod in ("transformers", "torch", "datasets", "httpx"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


def _requests(stage: str, data: CocoSplit, ids: list[int], template: PromptTemplate, system_mode: str,
              inputs: dict[str, dict[int, dict]]) -> list[GenRequest]:
    mode = "merge" if system_mode == "merge" else "system"
    if stage == "blendcap":
        return [GenRequest(c, template.messages(mode, captions=list(caps)))
                for c, caps in zip(ids, data.captions(ids))]
    if stage == "visualcap":   # ids without an image are left out (the caller counts them)
        messages = template.messages(mode)
        return [GenRequest(c, messages, image=img) for c, img in zip(ids, data.image_bytes(ids)) if img is not None]
    return [GenRequest(c, template.messages(mode, blendcap=inputs["blendcap"][c]["text"],
                                            visualcap=inputs["visualcap"][c]["text"])) for c in ids]


def _caption_record(stage: str, res: GenResult, data: CocoSplit, backend: Backend, template: PromptTemplate,
                    run_id: str, inputs: dict[str, dict[int, dict]], min_words: int) -> dict[str, Any]:
    """The stored record of one successful model call: cleaned caption, flags and provenance."""
    text = clean_caption(res.text)
    flags = caption_flags(text, res.finish_reason, min_words=min_words)
    rec: dict[str, Any] = {"cocoid": res.cocoid, "split": data.split, "stage": stage, "text": text,
                           "raw": res.text, "flags": flags, "finish_reason": res.finish_reason,
                           "retries": res.retries, "model": backend.model, "backend": backend.kind,
                           "prompt_sha256": template.sha256, "run_id": run_id}
    if stage == "holisticcap":
        b, v = inputs["blendcap"][res.cocoid], inputs["visualcap"][res.cocoid]
        rec["inputs_sha256"] = hashlib.sha256(f"{b['text']}\0{v['text']}".encode()).hexdigest()[:16]
        if b.get("flags") or v.get("flags"):
            rec["flags"] = flags + ["input_flagged"]
    return rec


def _holisticcap_inputs(run_dir: Path, todo: list[int],
                        report: StageReport) -> tuple[dict[str, dict[int, dict]], list[int]]:
    """HolisticCap needs BlendCap and VisualCap of the same id: their records, and the ids of ``todo``
    that have both (the others are counted in ``report.missing_inputs`` and skipped)."""
    inputs = {s: stage_records(run_dir, s) for s in ("blendcap", "visualcap")}
    ready = [c for c in todo if c in inputs["blendcap"] and c in inputs["visualcap"]]
    report.missing_inputs = len(todo) - len(ready)
    if report.missing_inputs:
        logger.warning("holisticcap: %d ids lack blendcap and/or visualcap output and are skipped; run those "
                       "stages first", report.missing_inputs)
    return inputs, ready


def _manifest(report: StageReport, started: str, data: CocoSplit, backend: Backend, template: PromptTemplate,
              cfg: StageSettings) -> dict[str, Any]:
    """The run manifest (``<run_dir>/<stage>/runs/<run_id>.json``) as it stands now."""
    return {
        "run_id": report.run_id, "stage": report.stage, "status": report.status, "started_at": started,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "pid": os.getpid(),
        "dataset": data.source, "split": data.split,
        "selection": {"ids": None if cfg.ids is None else len(cfg.ids), "limit": cfg.limit,
                      "shard": f"{cfg.shard[0]}/{cfg.shard[1]}"},
        "generation": backend.settings(),
        "prompt": {"source": template.source, "sha256": template.sha256, "system_mode": cfg.system_mode,
                   "template": template.canonical()},
        "report": asdict(report), "versions": _versions(), **(cfg.manifest_extra or {})}


def run_stage(stage: str, data: CocoSplit, run_dir: str | Path, backend: Backend, template: PromptTemplate,
              settings: StageSettings | None = None) -> StageReport:
    """Run one VCB stage over the selected ids of ``data`` that ``run_dir`` lacks.

    Args:
        stage: "blendcap", "visualcap" or "holisticcap".
        data: the COCO split (:func:`~.data.load_split`).
        run_dir: output folder (one sub-folder per stage).
        backend: the model (:func:`~.registry.make_backend`).
        template: the stage's prompt (:func:`~.prompts.load_prompt`).
        settings: selection, saving and error handling (:class:`StageSettings`; default: all ids).

    Returns:
        The :class:`StageReport` (also in ``<run_dir>/<stage>/runs/<run_id>.json``).
    """
    cfg = settings or StageSettings()
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if template.stage != stage:
        raise ValueError(f"template {template.source} is for {template.stage}, not {stage}")
    run_dir = Path(run_dir)
    stage_dir = run_dir / stage
    store = ShardStore(stage_dir, writer=f"s{cfg.shard[0]}of{cfg.shard[1]}", shard_size=cfg.shard_size,
                       flush_every_s=cfg.flush_every_s)
    done = store.load()
    if not cfg.allow_mixed_provenance:
        _check_provenance(done, backend, template, stage_dir)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    report = StageReport(stage=stage, run_id=run_id, model=backend.model, backend=backend.kind)
    selected = select_ids(data.ids, cfg.ids, cfg.shard, cfg.limit)
    report.selected = len(selected)
    todo = [c for c in selected if c not in done]
    report.done_before = report.selected - len(todo)

    inputs: dict[str, dict[int, dict]] = {}
    if stage == "holisticcap":
        inputs, todo = _holisticcap_inputs(run_dir, todo, report)

    manifest_path = stage_dir / "runs" / f"{run_id}.json"
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    mark_killed_runs(stage_dir)

    def write_manifest() -> None:
        write_json(manifest_path, _manifest(report, started, data, backend, template, cfg))

    retries_before = Counter(backend.retry_counts)
    flag_counts: Counter[str] = Counter()
    t0 = time.perf_counter()

    def refresh_report() -> None:
        report.written = store.written
        report.seconds = time.perf_counter() - t0
        report.captions_per_s = report.new / report.seconds if report.seconds > 0 else 0.0
        report.flag_counts = dict(flag_counts)
        report.retries = {k: v for k, v in (backend.retry_counts - retries_before).items() if v}

    def shard_written() -> None:  # the manifest follows the shards: a SIGKILL leaves current counts
        refresh_report()
        write_manifest()

    write_manifest()
    store.on_flush = shard_written
    bar = tqdm(total=len(todo), desc=stage, unit="cap", disable=not cfg.progress, dynamic_ncols=True, smoothing=0.05)
    try:
        for start in range(0, len(todo), backend.chunk_size):
            chunk = todo[start:start + backend.chunk_size]
            requests = _requests(stage, data, chunk, template, cfg.system_mode, inputs)
            if len(requests) < len(chunk):
                missing = sorted(set(chunk) - {r.cocoid for r in requests})
                report.missing_inputs += len(missing)
                logger.warning("%s: no image for cocoid %s; skipped", stage, ", ".join(map(str, missing)))
            results: list[GenResult] = backend.generate(requests) if requests else []
            failures = []
            for res in results:
                if res.error is not None:
                    failures.append(res)
                    continue
                rec = _caption_record(stage, res, data, backend, template, run_id, inputs, cfg.min_words)
                report.new += 1
                if rec["flags"]:
                    report.flagged += 1
                    flag_counts.update(rec["flags"])
                store.add(rec)  # last: a shard written here updates the manifest with these counts
            report.failed += len(failures)
            report.failed_ids += [f.cocoid for f in failures]
            bar.update(len(chunk))
            bar.set_postfix(flagged=report.flagged, retries=sum((backend.retry_counts - retries_before).values()),
                            refresh=False)
            if failures and cfg.on_error == "raise":
                f = failures[0]
                more = f" (and {len(failures) - 1} more in this batch)" if len(failures) > 1 else ""
                raise VCBError(f"{stage}: model call for cocoid {f.cocoid} failed{more}: {f.error}")
            for f in failures:
                logger.error("%s: cocoid %d failed (skipped; a rerun retries it): %s", stage, f.cocoid, f.error)
        report.status = "finished"
    except KeyboardInterrupt:
        report.status = "interrupted"
        raise
    except BaseException:
        report.status = "failed"
        raise
    finally:
        bar.close()
        store.on_flush = None
        store.close()
        refresh_report()
        write_manifest()
    return report
