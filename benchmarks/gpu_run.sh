#!/usr/bin/env bash
# The GPU checks in one go (for a lent GPU machine whose image has torch, jax, cupy,
# pytest and hypothesis but not array-api-compat: its wheel travels in .whl/).
# Writes logs and results to $OUT (default ./gpu-out).
#   ONLY=fused benchmarks/gpu_run.sh   # only the fused (Triton) fast path: tests + benchmark
#   ONLY=array benchmarks/gpu_run.sh   # only the array API checks (the earlier run)
#   ONLY=jax benchmarks/gpu_run.sh     # only favorplus's JAX programs against paper-style JAX
set -o pipefail
OUT=${OUT:-gpu-out}
ONLY=${ONLY:-all}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
# favorplus.flax needs flax >= 0.12 (Variable.get_value): carried in .whl/optional if older.
python3 -c "from flax import nnx; nnx.Variable.get_value" 2>/dev/null || python3 -m pip install -q \
  --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/optional/flax-*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, jax, cupy, flax; print('torch', torch.__version__, 'jax', jax.__version__, 'cupy', cupy.__version__, 'flax', flax.__version__, jax.devices())"
python3 -c "import triton; print('triton', triton.__version__)" || echo "triton missing: fused path not testable"
if [ "$ONLY" = "all" ] || [ "$ONLY" = "fused" ]; then
  # 1. The fused kernels' tests on the GPU (compiled, not interpreted; TF32 off in them).
  env -u TRITON_INTERPRET timeout "${TRITON_TEST_TIMEOUT:-120}" python3 -m pytest -q \
    -p no:cacheprovider tests/test_triton.py --durations=5 > "$OUT/triton_tests.log" 2>&1
  echo "triton tests exit $?"; tail -5 "$OUT/triton_tests.log"
  # 2. fused vs array API vs performer-pytorch vs SDPA, L = 1k ... 256k, with bound fractions.
  env -u TRITON_INTERPRET timeout "${FUSED_TIMEOUT:-300}" python3 benchmarks/gpu_fused.py \
    ${FUSED_ARGS:-} --out "$OUT/gpu_fused.json" > "$OUT/fused.log" 2>&1
  echo "fused bench exit $?"
  # 3. the same, quick lengths, with TF32 tensor-core products for every method.
  if [ "${FUSED_TF32:-1}" = 1 ]; then
    env -u TRITON_INTERPRET timeout "${FUSED_TF32_TIMEOUT:-150}" python3 benchmarks/gpu_fused.py \
      --quick --tf32 --out "$OUT/gpu_fused_tf32.json" > "$OUT/fused_tf32.log" 2>&1
    echo "fused tf32 bench exit $?"
  fi
  python3 - "$OUT/gpu_fused.json" "$OUT/gpu_fused_tf32.json" <<'PY' || true
import json, os, sys
for path in sys.argv[1:]:
  if not os.path.exists(path):
    continue
  res = json.load(open(path))
  print(path, "tf32" if res["tf32"] else "float32")
  for c in res["cells"]:
    if "s" in c:
        print(f"L={c['L']:>6} {c['method']:<20} causal={c['causal']!s:<5} bwd={c['backward']!s:<5} "
              f"{c['s'] * 1e3:9.3f} ms  bound {c['fraction of bound']:6.1%}  fused={c['fused kernels ran']}")
    else:
        print(f"L={c['L']:>6} {c['method']:<20} causal={c['causal']!s:<5} bwd={c['backward']!s:<5} {c['status']}")
PY
fi
if [ "$ONLY" = "all" ] || [ "$ONLY" = "jax" ]; then
  # 4. favorplus's jitted JAX programs against the paper-style JAX program (and the causal
  #    floor) on the GPU: bidirectional and causal, forward and forward + backward.
  timeout "${JAX_TIMEOUT:-240}" python3 benchmarks/jax_speed.py ${JAX_ARGS:---lengths 1024 4096 16384 --rounds 3} \
    --out "$OUT" > "$OUT/jax_speed.log" 2>&1
  echo "jax speed exit $?"; tail -8 "$OUT/jax_speed.log"
fi
if [ "$ONLY" = "all" ] || [ "$ONLY" = "array" ]; then
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/gpu.py --out "$OUT/gpu_bench.json" > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  FAVORPLUS_HYPOTHESIS_EXAMPLES=${EXAMPLES:-4} CI=1 timeout "${TEST_TIMEOUT:-280}" \
    python3 -m pytest -q -p no:cacheprovider tests -k "cuda or gpu or cupy or flax" --durations=8 \
    > "$OUT/tests.log" 2>&1
  echo "tests exit $?"
  tail -5 "$OUT/tests.log"
  cat "$OUT/bench.log" | head -120
fi
