#!/usr/bin/env bash
# One-shot GPU validation (issue 8): build in place, run the test suite with
# the CUDA cases, compute-sanitizer over the CUDA op tests, the kernel
# benchmarks. Writes logs to ${OUT:-gpu-out}/. Usage, from the repo root on a
# GPU machine with torch installed:  bash benchmarks/gpu_validate.sh [steps]
# steps: any of build tests sanitize bench e2e (default: all).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
steps=${*:-build tests sanitize bench e2e}
has() { [[ " $steps " == *" $1 "* ]]; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

if has build; then
  # -Xptxas=-v prints registers / shared memory / spills per kernel
  ESCAPE_FAST_CUDA_ARCHS=9.0 ESCAPE_FAST_PTXAS_VERBOSE=1 MAX_JOBS=16 \
    $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  grep -E "ptxas info|spill" "$OUT/build.log" | sort -u > "$OUT/ptxas.txt" || true
  $PY -c "import escape_fast; escape_fast.info()" 2>&1 | tee "$OUT/info.txt"
fi
if has tests; then
  $PY -m pytest tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --print-limit 20 --target-processes all \
      $PY -m pytest tests -q -p no:cacheprovider -k "cuda and not compile" -x 2>&1 | tail -25 > "$OUT/sanitize-$tool.log"
    echo "== $tool"; tail -6 "$OUT/sanitize-$tool.log"
  done
fi
if has bench; then
  $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-enable --benchmark-columns=median,iqr,rounds \
    --benchmark-sort=name --benchmark-json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -80
fi
if has e2e; then
  # issue 6: the built-in benchmark end to end (vs --reference), and the
  # MP-100-shaped run (ResNet-50, 256 px, K up to 68; target <= 20 s)
  $PY benchmarks/bench_eval.py --repeat 3 --out "$OUT/bench_eval.json" 2>&1 | tail -30 > "$OUT/bench_eval.log"
  $PY benchmarks/bench_mp100_shaped.py --device cuda --repeat 3 --out "$OUT/mp100_shaped.json" 2>&1 \
    | tee "$OUT/mp100_shaped.log" | tail -20
fi
