#!/usr/bin/env bash
# GPU check, for a CUDA machine (no network needed): about 6 minutes on one H100/H200-class GPU.
#   bash benchmarks/gpu_check.sh            # uses .venv/bin/python, or PYTHON=... to choose
# Writes benchmarks/results/gpu_generate_b16.json, gpu_generate_b100.json, gpu_sr_step.json,
# gpu_mining.json and gpu_tests.txt. Each part has its own time limit; a part that fails is reported
# and the others still run; the exit status is the number of failed parts.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
failed=0
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  if timeout "$limit" "$@"; then echo "== $name: ok in $((SECONDS - start)) s"
  else echo "== $name: FAILED (status $?) after $((SECONDS - start)) s"; failed=$((failed + 1)); fi
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 99
# decoding: fp32 vs bf16 weights, greedy and beam 5, batch 16 and 100 (no-cache reference at batch 16 only)
part generate_b16 90 "$PY" benchmarks/bench_generate.py --device cuda --batch-size 16 --repeats 3 \
  --static-cache --output "$OUT/gpu_generate_b16.json"
part generate_b100 60 "$PY" benchmarks/bench_generate.py --device cuda --batch-size 100 --repeats 3 \
  --no-reference --output "$OUT/gpu_generate_b100.json"
# the SR step at the paper's batch of 100 (20 bags x 5), SR-LV, fp32 and bf16, with bf16 agreement
part sr_step 150 "$PY" benchmarks/bench_sr_step.py --device cuda --bags 20 --steps 3 \
  --variants ours ours_bf16 agreement --output "$OUT/gpu_sr_step.json"
# TrueMatch mining: 118,287 x 1024-d, top-200 neighbours, on the GPU
part mining 90 "$PY" benchmarks/bench_mining.py --device cuda --sizes 118287 --output "$OUT/gpu_mining.json"
# the test suite's CUDA-marked tests
part cuda_tests 60 bash -c "'$PY' -m pytest -q -m cuda -rs tests > '$OUT/gpu_tests.txt' 2>&1; status=\$?; tail -3 '$OUT/gpu_tests.txt'; exit \$status"
echo "failed parts: $failed"
exit "$failed"
