"""Export Visual Caption Boost outputs as the HolisticCap dataset folder (paper Sec. 2, App. A.2).

The folder holds ``data/<split>-00000-of-00001.parquet`` and a dataset card ``README.md``
whose YAML ``configs:`` makes ``datasets.load_dataset(folder)`` return one split per COCO
split. Columns: ``cocoid``, ``split``, ``coco_captions``, ``blendcap``, ``visualcap``,
``holisticcap`` and, per stage, the provenance ``<stage>_flags``, ``<stage>_raw``,
``<stage>_model`` and ``<stage>_prompt_sha256``. :func:`caption_length_stats` gives the
words/tokens per caption summary of App. A.2, Table 9, written as ``token_stats.{json,md}``
and into the card.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .data import load_dataset_dict
from .prompts import STAGES
from .store import read_records

__all__ = ["export_holisticcap", "caption_length_stats", "length_table", "PAPER_TABLE9", "DEFAULT_TOKENIZER"]

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "openai/clip-vit-base-patch32"
#: App. A.2, Table 9 (mean, std): words and CLIP tokens per caption.
PAPER_TABLE9 = {"COCO": ((10.5, 2.4), (13.5, 2.7)), "BlendCap": ((20.1, 6.0), (25.4, 7.0)),
                "HolisticCap": ((41.5, 13.1), (50.2, 15.4)), "Visual Caption": ((51.1, 14.4), (59.2, 12.8))}
_ROWS = (("COCO", "coco_captions"), ("BlendCap", "blendcap"), ("HolisticCap", "holisticcap"),
         ("Visual Caption", "visualcap"))


def caption_length_stats(texts: Iterable[str], tokenizer) -> dict[str, float]:
    """Mean and (population) standard deviation of words and tokens per caption.

    Words are whitespace-separated pieces; tokens are ``len(tokenizer(text).input_ids)`` with
    the tokenizer's special tokens and no truncation, which is how Table 9 appears to count
    (COCO: 10.5 words but 13.5 CLIP tokens, BOS/EOS included).
    """
    texts = [t for t in texts if t is not None]
    if not texts:
        return {"n": 0, "words_mean": 0.0, "words_std": 0.0, "tokens_mean": 0.0, "tokens_std": 0.0}
    words = [len(t.split()) for t in texts]
    toks = [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
    return {"n": len(texts), "words_mean": statistics.fmean(words), "words_std": statistics.pstdev(words),
            "tokens_mean": statistics.fmean(toks), "tokens_std": statistics.pstdev(toks)}


def length_table(stats: dict[str, dict[str, float]], tokenizer_name: str = "") -> str:
    """Markdown table in the layout of App. A.2 Table 9, with the paper's values beside ours."""
    lines = [f"| Dataset | Words/Cap | Toks/Cap{f' ({tokenizer_name})' if tokenizer_name else ''} | n captions "
             "| paper Words/Cap | paper Toks/Cap |", "|---|---|---|---|---|---|"]
    for i, (name, _) in enumerate(_ROWS, 1):
        s = stats[name]
        (pw, pws), (pt, pts) = PAPER_TABLE9[name]
        lines.append(f"| {i} {name} | {s['words_mean']:.1f} ±{s['words_std']:.1f} | {s['tokens_mean']:.1f} "
                     f"±{s['tokens_std']:.1f} | {s['n']} | {pw} ±{pws} | {pt} ±{pts} |")
    return "\n".join(lines)


def _features():
    import datasets

    text, strings = datasets.Value("string"), datasets.List(datasets.Value("string"))
    cols: dict[str, Any] = {"cocoid": datasets.Value("int64"), "split": text, "coco_captions": strings}
    for s in STAGES:
        cols[s] = text
    for s in STAGES:
        cols.update({f"{s}_flags": strings, f"{s}_raw": text, f"{s}_model": text, f"{s}_prompt_sha256": text})
    return datasets.Features(cols)


def _runs(run_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for s in STAGES:
        runs = []
        for p in sorted((run_dir / s / "runs").glob("*.json")):
            try:
                m = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            runs.append({"run_id": m.get("run_id"), "status": m.get("status"), "split": m.get("split"),
                         "generation": m.get("generation"), "prompt_sha256": (m.get("prompt") or {}).get("sha256"),
                         "new": (m.get("report") or {}).get("new"),
                         "captions_per_s": (m.get("report") or {}).get("captions_per_s")})
        out[s] = runs
    return out


def _card(counts: dict[str, int], stats_md: str, runs: dict[str, list[dict]], flag_counts: dict[str, dict[str, int]],
          splits: list[str]) -> str:
    configs = "\n".join(f"  - split: {s}\n    path: data/{s}-*.parquet" for s in splits)
    models = {s: sorted({(r["generation"] or {}).get("model", "?") for r in runs[s]}) for s in STAGES}
    hashes = {s: sorted({r["prompt_sha256"] or "?" for r in runs[s]}) for s in STAGES}
    prov = "\n".join(f"| {s} | {', '.join(models[s]) or '-'} | {', '.join(h[:12] for h in hashes[s]) or '-'} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(flag_counts[s].items())) or 'none'} |" for s in STAGES)
    rows = ", ".join(f"{s}: {n}" for s, n in counts.items())
    return f"""---
pretty_name: HolisticCap
language:
- en
task_categories:
- image-to-text
tags:
- coco
- image-captioning
- synthetic-captions
configs:
- config_name: default
  data_files:
{configs}
---

# HolisticCap (Visual Caption Boost captions of COCO)

Captions made with *Visual Caption Boost* (paper "No Detail Left Behind", Sec. 2 and App. A):
an instruction LLM blends the human COCO captions of an image (**BlendCap**), a VLM describes
the image (**VisualCap**), and the LLM instils VisualCap's details into BlendCap while
preferring BlendCap where they conflict (**HolisticCap**). Rows per split: {rows}.

Images are not included: join on `cocoid` with COCO (Karpathy splits).

```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder")   # or the Hub repo id
ds["train"][0]["holisticcap"]
```

## Columns

| column | content |
|---|---|
| `cocoid` | COCO image id |
| `split` | Karpathy split (train / val / test) |
| `coco_captions` | the human COCO captions |
| `blendcap`, `visualcap`, `holisticcap` | the generated captions, cleaned (chatter and rambling removed) |
| `<stage>_raw` | the model's raw answer |
| `<stage>_flags` | quality flags: empty, too_short, repetitive, refusal, truncated, input_flagged (rows kept) |
| `<stage>_model` | model that wrote the caption |
| `<stage>_prompt_sha256` | SHA-256 of the prompt template (system prompt, user template, in-context examples) |

## Provenance

| stage | model(s) | prompt sha256 | flags |
|---|---|---|---|
{prov}

Generation settings of every run are in `runs.json` beside this card.

## Caption lengths (as App. A.2, Table 9)

{stats_md}
"""


def export_holisticcap(run_dir: str | Path, dataset: str | Path, out_dir: str | Path, *,
                       splits: list[str] | None = None, tokenizer: Any = DEFAULT_TOKENIZER,
                       allow_partial: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write the HolisticCap dataset folder from a VCB run folder and the COCO dataset.

    Args:
        run_dir: the ``--out`` folder of ``vcb run`` (stage sub-folders).
        dataset: the COCO dataset (docs/formats.md: COCO dataset) the run captioned.
        out_dir: the folder to write (replaced atomically; must not exist unless ``overwrite``).
        splits: COCO splits to export (default: every split that has outputs).
        tokenizer: tokenizer (object, Hub id or folder) for the token counts; default CLIP's.
        allow_partial: keep rows that lack some stage (empty values) instead of dropping them.
        overwrite: replace an existing ``out_dir``.

    Returns:
        Summary: rows per split, rows dropped for missing stages, flag counts and length stats.
    """
    import datasets

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    records = {s: read_records(run_dir / s) for s in STAGES}
    if not any(records.values()):
        raise ValueError(f"{run_dir} has no VCB outputs (expected {', '.join(STAGES)} sub-folders with shards/)")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        # a local folder is named by its last component (the card must not carry machine paths)
        tok_name = Path(tokenizer).name if Path(tokenizer).exists() else str(tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    else:
        tok_name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    dd = load_dataset_dict(dataset)
    have = {int(c) for recs in records.values() for c in recs}
    splits = splits or [s for s in dd if any(int(c) in have for c in dd[s]["cocoid"])]
    features = _features()
    counts, dropped, flag_counts = {}, {}, {s: {} for s in STAGES}
    texts: dict[str, list[str]] = {name: [] for name, _ in _ROWS}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        (tmp / "data").mkdir()
        for split in splits:
            if split not in dd:
                raise KeyError(f"{dataset} has no split {split!r}; available: {sorted(dd)}")
            src = dd[split].select_columns(["cocoid", "captions"])
            cols: dict[str, list] = {k: [] for k in features}
            dropped[split] = 0
            for cid, caps in zip(src["cocoid"], src["captions"]):
                recs = {s: records[s].get(int(cid)) for s in STAGES}
                if not any(recs.values()) or (not allow_partial and not all(recs.values())):
                    dropped[split] += bool(any(recs.values()))
                    continue
                cols["cocoid"].append(int(cid))
                cols["split"].append(split)
                cols["coco_captions"].append(list(caps))
                for s, r in recs.items():
                    r = r or {}
                    cols[s].append(r.get("text"))
                    cols[f"{s}_flags"].append(r.get("flags") or [])
                    cols[f"{s}_raw"].append(r.get("raw"))
                    cols[f"{s}_model"].append(r.get("model"))
                    cols[f"{s}_prompt_sha256"].append(r.get("prompt_sha256"))
                    for f in r.get("flags") or []:
                        flag_counts[s][f] = flag_counts[s].get(f, 0) + 1
            counts[split] = len(cols["cocoid"])
            datasets.Dataset.from_dict(cols, features=features).to_parquet(
                str(tmp / "data" / f"{split}-00000-of-00001.parquet"))
            for caps in cols["coco_captions"]:
                texts["COCO"] += caps
            for name, col in _ROWS[1:]:
                texts[name] += [t for t in cols[col] if t is not None]
            if dropped[split]:
                logger.warning("%s: %d ids lack some stage and were left out (use --allow-partial to keep them)",
                               split, dropped[split])
        stats = {name: caption_length_stats(texts[name], tokenizer) for name, _ in _ROWS}
        table = length_table(stats, tok_name)
        runs = _runs(run_dir)
        summary = {"rows": counts, "dropped_incomplete": dropped, "flags": flag_counts, "length_stats": stats,
                   "tokenizer": tok_name}
        (tmp / "token_stats.json").write_text(json.dumps({"tokenizer": tok_name, "stats": stats,
                                                          "paper_table9": PAPER_TABLE9}, indent=2) + "\n")
        (tmp / "token_stats.md").write_text(table + "\n")
        (tmp / "runs.json").write_text(json.dumps(runs, indent=2, ensure_ascii=False) + "\n")
        (tmp / "README.md").write_text(_card(counts, table, runs, flag_counts, list(counts)), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
