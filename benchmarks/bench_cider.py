"""CIDEr-D speed: metrics/cider.py vs pycocoevalcap's ``Cider``, measured in the same run.

Workload (fixed seed): N images (5,000) x 5 reference captions plus one candidate each, synthetic
but COCO-like: a 3,000-word vocabulary with Zipf(1.1) frequencies (function words first), 8-20
words, a few image-specific "topic" words so that candidates share n-grams with their
references, a capitalised first word, some commas and a final period.

Measured (best of ``--repeats`` runs; wall-clock and process CPU seconds):

1. **scoring, no tokenisation**: ``pycocoevalcap.cider.cider.Cider().compute_score`` vs
   ``metrics.cider.cider_d(..., tokenize=False)`` on the same tokenised captions (both compute
   document frequencies from these references, as pycocoevalcap does). Per-caption scores must
   agree within 1e-12.
2. **tokenisation**: pycocoevalcap's Java ``PTBTokenizer`` (references, then candidates) vs
   ``metrics.ptb_tokenizer.ptb_tokenize``. Outputs must be identical.
3. **with tokenisation**: 1 + 2.
4. **BLEU-1..4**: ``Bleu(4)`` vs ``metrics.bleu.bleu`` (tokenised input); must be identical.
5. **RL batch**: ``CiderD(train references)`` built once (the N images; its time is reported),
   then one batch of 400 sampled captions scored against their images' references with these
   document frequencies (``score(captions, ids=image_ids)``), median over runs; with and without
   tokenising the 400 captions.

    python benchmarks/bench_cider.py [--quick] [--repeats 3] [--runs 3]

Prints the ratios and writes benchmarks/results/cider.json (``--quick``: 500 images, one run,
cider_quick.json). ``--runs N`` repeats the whole measurement N times and reports the run with
the median CIDEr-D speedup, with a summary of every run. Timings depend on the machine and on other processes running at the same time
(the load average is recorded).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import scipy  # noqa: E402

from bench_common import write_results  # noqa: E402
from metrics.bleu import bleu  # noqa: E402
from metrics.cider import CiderD, cider_d  # noqa: E402
from metrics.ptb_tokenizer import clear_cache, ptb_tokenize  # noqa: E402

FUNCTION_WORDS = ("a of the on in with and is an to at two next near sitting standing table man woman "
                  "people street white black red large small some that are it its by front holding").split()


def make_data(n_images: int, n_refs: int = 5, vocab_size: int = 3000, seed: int = 0) -> tuple[list[list[str]], list[str]]:
    """Synthetic COCO-like references (n_images x n_refs) and one candidate per image."""
    rng = random.Random(seed)
    syllables = ["ba", "ko", "ri", "tan", "mel", "os", "pu", "chi", "len", "dor", "ga", "vi", "sen", "ru", "pla", "te"]
    vocab = list(FUNCTION_WORDS)
    seen = set(vocab)
    while len(vocab) < vocab_size:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(vocab_size)]

    def caption(topic: list[str]) -> str:
        words = [rng.choice(topic) if rng.random() < 0.35 else rng.choices(vocab, weights)[0]
                 for _ in range(rng.randint(8, 20))]
        if rng.random() < 0.15:
            words[rng.randrange(len(words) - 1)] += ","
        text = " ".join(words)
        return text[0].upper() + text[1:] + ("." if rng.random() < 0.8 else "")

    refs, cands = [], []
    for _ in range(n_images):
        topic = rng.sample(vocab[50:], 6)
        refs.append([caption(topic) for _ in range(n_refs)])
        cands.append(caption(topic))
    return refs, cands


def best(fn, repeats: int) -> tuple[float, float, object]:
    """(best wall seconds, best CPU seconds, result of the last run)."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), out


def java_tokenize(refs: list[list[str]], cands: list[str]) -> tuple[dict, dict]:
    """pycocoevalcap's tokenisation: the Java PTBTokenizer on references, then on candidates."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(refs)})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(cands)})
    return gts, res


def python_tokenize(refs: list[list[str]], cands: list[str]) -> tuple[list[list[str]], list[str]]:
    """Our tokenisation, the same two calls, from a cold cache (the memo of lexer scans is cleared)."""
    clear_cache()
    flat = ptb_tokenize([c for r in refs for c in r])
    sizes = [len(r) for r in refs]
    ends = np.cumsum(sizes).tolist()
    return [flat[e - s:e] for s, e in zip(sizes, ends)], ptb_tokenize(cands)


def measure(args: argparse.Namespace) -> dict:
    """One full measurement (all sections); returns the result record."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    load_before = os.getloadavg()
    refs, cands = make_data(args.images)
    print(f"{args.images} images x 5 references + 1 candidate; best of {args.repeats} runs")

    # 1. tokenisation (also gives the tokenised captions both scorers use)
    j_wall, j_cpu, (gts, res) = best(lambda: java_tokenize(refs, cands), args.repeats)
    p_wall, p_cpu, (tok_refs, tok_cands) = best(lambda: python_tokenize(refs, cands), args.repeats)
    same_tokens = [gts[i] for i in range(len(refs))] == tok_refs and [res[i][0] for i in range(len(cands))] == tok_cands
    print(f"tokenisation: Java PTBTokenizer {j_wall:.2f}s, ours {p_wall:.2f}s (x{j_wall / p_wall:.1f}); identical: {same_tokens}")

    # 2. CIDEr-D on the tokenised captions (document frequencies from these references)
    c_wall, c_cpu, (their_cider, their_scores) = best(lambda: Cider().compute_score(gts, res), args.repeats)
    o_wall, o_cpu, (our_cider, our_scores) = best(lambda: cider_d(tok_cands, tok_refs, tokenize=False), args.repeats)
    max_diff = float(np.abs(np.asarray(our_scores) - np.asarray(their_scores)).max())
    print(f"CIDEr-D: pycocoevalcap {c_wall:.2f}s, ours {o_wall:.3f}s (x{c_wall / o_wall:.1f}; CPU x{c_cpu / o_cpu:.1f}); "
          f"corpus {our_cider:.6f} vs {their_cider:.6f}, max |diff| per caption {max_diff:.1e}")
    print(f"with tokenisation: pycocoevalcap {j_wall + c_wall:.2f}s, ours {p_wall + o_wall:.2f}s "
          f"(x{(j_wall + c_wall) / (p_wall + o_wall):.1f})")

    # 3. BLEU
    b_wall, b_cpu, (their_bleu, their_per) = best(lambda: Bleu(4).compute_score(gts, res, verbose=0), args.repeats)
    ob_wall, ob_cpu, (our_bleu, our_per) = best(lambda: bleu(tok_cands, tok_refs, tokenize=False), args.repeats)
    same_bleu = our_bleu == their_bleu and our_per == their_per
    print(f"BLEU-1..4: pycocoevalcap {b_wall:.2f}s, ours {ob_wall:.3f}s (x{b_wall / ob_wall:.1f}); identical: {same_bleu}")

    # 4. RL batch with precomputed document frequencies
    rng = random.Random(1)
    batch = [rng.randrange(args.images) for _ in range(args.rl_batch)]
    batch_caps = [cands[i] for i in batch]
    clear_cache()
    build_wall, build_cpu, scorer = best(lambda: CiderD(dict(enumerate(refs))), 1)
    pre_scorer = CiderD(dict(enumerate(tok_refs)), tokenize=False)
    batch_tok = [tok_cands[i] for i in batch]
    runs = max(5, 5 * args.repeats)
    times = {"ids_tokenize": [], "ids_pretokenized": [], "references_pretokenized": []}
    for _ in range(runs):
        t = time.perf_counter()
        scorer.score(batch_caps, ids=batch)
        times["ids_tokenize"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rl_scores = pre_scorer.score(batch_tok, ids=batch)[1]
        times["ids_pretokenized"].append(time.perf_counter() - t)
        t = time.perf_counter()
        pre_scorer.score(batch_tok, [tok_refs[i] for i in batch])
        times["references_pretokenized"].append(time.perf_counter() - t)
    rl = {k: statistics.median(v) for k, v in times.items()}
    rl_same = bool(np.abs(rl_scores - our_scores[batch]).max() <= 1e-12)  # same DF corpus: same scores
    pb_wall, _, _ = best(lambda: Cider().compute_score({k: gts[i] for k, i in enumerate(batch)},
                                                       {k: res[i] for k, i in enumerate(batch)}), args.repeats)
    print(f"RL batch of {args.rl_batch}: CiderD(train refs) built once in {build_wall:.2f}s (with tokenisation); "
          f"score(ids=...) {1000 * rl['ids_tokenize']:.1f} ms with tokenisation, {1000 * rl['ids_pretokenized']:.1f} ms "
          f"pre-tokenised, {1000 * rl['references_pretokenized']:.1f} ms with references given; "
          f"(pycocoevalcap on the batch alone, its own DF: {1000 * pb_wall:.0f} ms)")

    equal = same_tokens and max_diff <= 1e-12 and same_bleu and rl_same
    result = {
        "command": "python benchmarks/bench_cider.py" + (" --quick" if args.quick else
                                                          f" --repeats {args.repeats} --runs {args.runs}"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "scipy": scipy.__version__,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "workload": {"images": args.images, "references_per_image": 5, "vocabulary": 3000, "words": "8-20",
                     "seed": 0, "repeats": args.repeats, "timing": "best of repeats; RL: median"},
        "cider_no_tokenization": {"pycocoevalcap_s": round(c_wall, 4), "ours_s": round(o_wall, 4),
                                  "speedup": round(c_wall / o_wall, 2), "pycocoevalcap_cpu_s": round(c_cpu, 4),
                                  "ours_cpu_s": round(o_cpu, 4), "cpu_speedup": round(c_cpu / o_cpu, 2),
                                  "corpus_cider": our_cider, "max_abs_diff_per_caption": max_diff},
        "tokenization": {"java_ptbtokenizer_s": round(j_wall, 4), "ours_s": round(p_wall, 4),
                         "speedup": round(j_wall / p_wall, 2), "identical": same_tokens},
        "cider_with_tokenization": {"pycocoevalcap_s": round(j_wall + c_wall, 4), "ours_s": round(p_wall + o_wall, 4),
                                    "speedup": round((j_wall + c_wall) / (p_wall + o_wall), 2)},
        "bleu_no_tokenization": {"pycocoevalcap_s": round(b_wall, 4), "ours_s": round(ob_wall, 4),
                                 "speedup": round(b_wall / ob_wall, 2), "identical": same_bleu},
        "rl_batch": {"captions": args.rl_batch, "build_corpus_s": round(build_wall, 4),
                     "score_ids_with_tokenization_ms": round(1000 * rl["ids_tokenize"], 2),
                     "score_ids_pretokenized_ms": round(1000 * rl["ids_pretokenized"], 2),
                     "score_with_references_pretokenized_ms": round(1000 * rl["references_pretokenized"], 2),
                     "pycocoevalcap_batch_only_ms": round(1000 * pb_wall, 1), "runs": runs},
        "outputs_equal": equal,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="number of images (5 references + 1 candidate each)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the best is kept)")
    parser.add_argument("--rl-batch", type=int, default=400, help="captions in one RL batch")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole measurement (the machine may be shared); the run with the median "
                             "CIDEr-D speedup is reported, every run is summarised under 'runs'")
    parser.add_argument("--quick", action="store_true", help="500 images, one run: a smoke test")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default benchmarks/results/cider.json, cider_quick.json with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.runs = 500, 1, 1
    output = args.output or ROOT / "benchmarks" / "results" / ("cider_quick.json" if args.quick else "cider.json")
    records = []
    for run in range(args.runs):
        if args.runs > 1:
            print(f"--- run {run + 1}/{args.runs}")
        records.append(measure(args))
    ranked = sorted(records, key=lambda r: r["cider_no_tokenization"]["speedup"])
    result = dict(ranked[(len(ranked) - 1) // 2])  # the median run (the lower one for an even count)
    result["outputs_equal"] = all(r["outputs_equal"] for r in records)
    result["runs"] = [
        {"cider_speedup": r["cider_no_tokenization"]["speedup"], "cider_ours_s": r["cider_no_tokenization"]["ours_s"],
         "cider_pycocoevalcap_s": r["cider_no_tokenization"]["pycocoevalcap_s"],
         "cider_with_tokenization_speedup": r["cider_with_tokenization"]["speedup"],
         "tokenization_speedup": r["tokenization"]["speedup"], "bleu_speedup": r["bleu_no_tokenization"]["speedup"],
         "load_average_before": r["machine"]["load_average_before"],
         "load_average_after": r["machine"]["load_average_after"]} for r in records]
    if args.runs > 1:
        print("CIDEr-D speedups of the runs: " + ", ".join(f"x{r['cider_speedup']:.1f}" for r in result["runs"]))
    write_results(output, result)
    if not result["outputs_equal"]:
        sys.exit("outputs differ from pycocoevalcap: see above")


if __name__ == "__main__":
    main()
