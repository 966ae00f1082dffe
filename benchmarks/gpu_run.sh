#!/usr/bin/env bash
# The GPU checks in one go (for a lent GPU machine whose image has torch, jax, cupy,
# pytest and hypothesis but not array-api-compat: its wheel travels in .whl/).
# Writes logs and results to $OUT (default ./gpu-out).
set -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
# favorplus.flax needs flax >= 0.12 (Variable.get_value): carried in .whl/optional if older.
python3 -c "from flax import nnx; nnx.Variable.get_value" 2>/dev/null || python3 -m pip install -q \
  --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/optional/flax-*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, jax, cupy, flax; print('torch', torch.__version__, 'jax', jax.__version__, 'cupy', cupy.__version__, 'flax', flax.__version__, jax.devices())"
timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/gpu.py --out "$OUT/gpu_bench.json" > "$OUT/bench.log" 2>&1
echo "bench exit $?"
FAVORPLUS_HYPOTHESIS_EXAMPLES=${EXAMPLES:-4} CI=1 timeout "${TEST_TIMEOUT:-280}" \
  python3 -m pytest -q -p no:cacheprovider tests -k "cuda or gpu or cupy or flax" --durations=8 \
  > "$OUT/tests.log" 2>&1
echo "tests exit $?"
tail -5 "$OUT/tests.log"
cat "$OUT/bench.log" | head -120
