"""Score captions on TrueMatch, RD100, CLIPScore, ImageCoDe and CIDEr-D / BLEU-4 (NDLB Sec. 3-5), or
caption the benchmarks with several models and print a Table-1-style leaderboard.

    python evaluate_captions.py --captions preds.json --truematch DIR_OR_HUB_ID --references coco/
    python evaluate_captions.py --models clipcap:manu-gaur/NDLB transformers:llava-hf/llava-v1.6-34b-hf \\
        openai:llava@http://127.0.0.1:8000/v1 --captions other.json --truematch DIR --output-dir board/

The ``evaluation`` package does the work; this script parses the arguments, makes one call, prints.
"""

from __future__ import annotations

import argparse
import sys

from evaluation import (BENCHMARKS, BenchmarkRequestError, CaptioningError, JudgeSettings, evaluate_captions,
                        format_table, leaderboard_markdown, load_benchmarks, log_to_stderr, parse_model_spec,
                        read_captions, run_leaderboard, write_json)
from evaluation.scoring import judge_problem

EPILOG = """benchmarks (--benchmark; default: every one whose data is given):
  truematch  R@1 within TrueMatch bags of 3/5/7 similar images          needs --truematch
  rd100      R@1 against 99 random distractors from the evaluated set  needs an image set (*)
  clipscore  CLIP-S (+ RefCLIP-S with references), Hessel et al. 2021  needs an image set (*)
  nlg        CIDEr-D and BLEU-1..4 against reference captions          needs references (*)
  imagecode  R@1 within ImageCoDe's sets of 10 images                  needs --imagecode-data/-images
(*) the evaluated set is, in this order: --references (a COCO dataset folder / Hub id, split
    --split, with images and captions; or a json {id: [captions]} plus --images), else --images
    with the captions' ids, else the images and COCO captions of the TrueMatch bags.
Vocabulary size, words used >= 5 times and mean length are computed on the evaluated set.
Model specs (--models): clipcap:PATH_OR_ID, transformers:ID, open_clip:NAME[@TAG], openai:NAME@URL,
each optionally followed by ?key=value&... (prompt, max_new_tokens, num_beams, batch_size, dtype,
name, params, ...); see evaluation/captioners.py.

examples:
  python evaluate_captions.py --captions preds.jsonl --benchmark truematch \\
      --truematch authors_bags/ --truematch-images val2014/ --output results.json
  python evaluate_captions.py --models "transformers:google/paligemma-3b-mix-448" \\
      "open_clip:coca_ViT-L-14@mscoco_finetuned_laion2B-s13B-b90k" --truematch truematch/"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate_captions.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", nargs="+", metavar="FILE", help="captions file(s): json {id: caption} or list of "
                   "{cocoid|image_id|image, caption}, jsonl records, or csv with image_id|cocoid|image,caption")
    p.add_argument("--models", nargs="+", metavar="SPEC", help="caption the benchmarks with these models and print a "
                   "leaderboard (with --captions files as more rows)")
    p.add_argument("--benchmark", nargs="+", choices=BENCHMARKS, metavar="NAME",
                   help=f"benchmarks to run, any of {', '.join(BENCHMARKS)} (default: all with data)")
    g = p.add_argument_group("data")
    g.add_argument("--truematch", metavar="SRC", help="TrueMatch: our dataset (folder or Hub id, configs "
                   "bags_3/5/7) or the authors' folder with 3.json 5.json 7.json (lists of COCO ids)")
    g.add_argument("--truematch-images", metavar="DIR", help="images folder for the authors' format "
                   "(COCO_val2014_%%012d.jpg or %%012d.jpg; default: SRC/images)")
    g.add_argument("--bag-sizes", nargs="+", type=int, default=[3, 5, 7], metavar="S", help="TrueMatch bag sizes")
    g.add_argument("--references", metavar="SRC", help="references: a COCO dataset folder or Hub id "
                   "(datasets_scripts.coco; save_to_disk or parquet) or a json {id: [captions]}")
    g.add_argument("--split", default="test", help="split of a --references dataset (default: test)")
    g.add_argument("--images", metavar="DIR", help="images folder for RD100 / CLIPScore (<id>.jpg, "
                   "%%012d.jpg or COCO_*_%%012d.jpg, searched recursively)")
    g.add_argument("--imagecode-data", metavar="JSON", help="ImageCoDe descriptions (valid_data.json)")
    g.add_argument("--imagecode-images", metavar="DIR", help="ImageCoDe image-sets folder (<set>/img<i>.jpg)")
    g = p.add_argument_group("judge (the CLIP model that scores retrieval)")
    g.add_argument("--judge", default="openai/clip-vit-base-patch32", help="transformers CLIP id or folder, "
                   "open_clip name (with --judge-pretrained) or open_clip folder (default: %(default)s)")
    g.add_argument("--judge-backend", default="auto", choices=["auto", "transformers", "open_clip"])
    g.add_argument("--judge-pretrained", metavar="TAG", help="open_clip pretrained tag, e.g. openai")
    g.add_argument("--device", help="cuda / cpu for the judge and the captioners (default: cuda when available)")
    g.add_argument("--batch-size", type=int, default=64, help="judge batch size (default: 64)")
    g.add_argument("--cache-dir", metavar="DIR", help="cache image embeddings here (keyed by judge and image id)")
    g = p.add_argument_group("RD100")
    g.add_argument("--num-distractors", type=int, default=99, help="random distractors per image (default: 99)")
    g.add_argument("--seed", type=int, default=0, help="seed of the distractor sampling (default: 0)")
    g = p.add_argument_group("captioning (--models; a spec's own ?options win)")
    g.add_argument("--prompt", help="instruction for chat models (default: a short-caption instruction; "
                   "'visualcap' = the paper's VisualCap prompt)")
    g.add_argument("--max-new-tokens", type=int, help="longest caption in tokens (CLIP reads 77: longer ones count "
                   "in the >ctx column)")
    g.add_argument("--num-beams", type=int, help="beam width (default: each model's own, greedy for chat models)")
    g.add_argument("--caption-batch-size", type=int, help="images per generate call")
    g.add_argument("--dtype", default="auto", help="auto (bf16 where supported), float32, bfloat16, float16")
    g.add_argument("--caption-cache", metavar="DIR", help="caption cache, reused by reruns and other benchmarks "
                   "(default: $NDLB_CAPTION_CACHE or HF_HOME/ndlb_captions)")
    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="JSON", help="one captions file: write all results (with missing ids) here")
    g.add_argument("--output-dir", default="leaderboard", metavar="DIR", help="leaderboard: leaderboard.md/.csv/"
                   ".json, captions/<model>.json, results/<model>.json (default: %(default)s)")
    g.add_argument("--strict", action="store_true", help="exit with status 1 when any needed caption is missing")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.captions and not args.models:
        parser.error("give --captions FILE(s) to score, or --models SPEC(s) to caption and rank")
    try:
        problem, models = judge_problem(args.judge), [parse_model_spec(m) for m in args.models or []]
    except ValueError as e:
        problem = f"--models: {e}"
    if problem:
        parser.error(problem)
    log_to_stderr()
    judge = JudgeSettings(args.judge, args.judge_backend, args.judge_pretrained, args.device, args.batch_size,
                          args.cache_dir)
    data_args = dict(truematch=args.truematch, truematch_images=args.truematch_images, bag_sizes=args.bag_sizes,
                     references=args.references, split=args.split, images=args.images, benchmarks=args.benchmark,
                     imagecode_data=args.imagecode_data, imagecode_images=args.imagecode_images)
    score_args = dict(benchmarks=args.benchmark, num_distractors=args.num_distractors, seed=args.seed)
    defaults = dict(device=args.device, dtype=args.dtype, batch_size=args.caption_batch_size, prompt=args.prompt,
                    max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    leaderboard = bool(models) or len(args.captions) > 1
    try:
        if leaderboard:
            board = run_leaderboard(models, load_benchmarks(**data_args), judge, out_dir=args.output_dir,
                                    captions_files=args.captions, cache_dir=args.caption_cache,
                                    captioner_defaults=defaults, **score_args)
        else:
            captions = read_captions(args.captions[0])
            results = evaluate_captions(captions, load_benchmarks(**data_args), judge, captions_file=args.captions[0],
                                        **score_args)
    except BenchmarkRequestError as e:  # the benchmarks asked for lack their data
        raise SystemExit(f"error: {e}") from None
    except (OSError, ValueError, KeyError, CaptioningError) as e:  # a missing file, an unloadable judge or image
        print(f"error: {e}", file=sys.stderr)
        return 2
    if leaderboard:
        print(leaderboard_markdown(board["rows"]))
        print(f"wrote {', '.join(board['files'].values())} (captions and results per model beside them)")
        n_missing = sum(sum(r["missing"].values()) for r in board["rows"])
    else:
        print(format_table(results["table"]))
        if args.output:
            write_json(args.output, results)
            print(f"wrote {args.output}")
        n_missing = sum(len(v) for v in results["missing"].values())
    if args.strict and n_missing:
        print(f"error: {n_missing} needed captions are missing (--strict)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
