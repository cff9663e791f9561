#!/usr/bin/env bash
# The GPU checks and benchmarks (H100/H200), in stages of under ten minutes each, so that a
# machine borrowed for a short time can run them one at a time. Logs go to $OUT; record the
# tables with device and date in docs/PERFORMANCE.md.
#
# For the side-by-side bitsandbytes rows on an offline GPU machine (torch already installed),
# fetch bitsandbytes' wheel on a machine with network and copy .whl/ next to the repository:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# then, one stage per command:
#   bash experiments/gpu_session.sh check    # kernels vs XLA vs bitsandbytes, on the GPU (~5 min)
#   bash experiments/gpu_session.sh bench4   # bench_4bit.py + bench_decode.py
#   bash experiments/gpu_session.sh bench8   # bench_int8.py + bench_optim.py
#   bash experiments/gpu_session.sh e2e      # bench_qlora_step.py (1b, 7b)
#   bash experiments/gpu_session.sh load     # bench_load.py (20B bf16 checkpoint -> NF4)
# or, when the lease is one short one (15 minutes of device time, start included):
#   bash experiments/gpu_session.sh lease    # the open checks + 8192^2 rows of bench4/bench8 + decode (~9 min)
set -uo pipefail
stage=${1:?usage: gpu_session.sh check|bench4|bench8|e2e|load|lease}
OUT=${OUT:-/tmp/jaxbnb_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
py=python3
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

run() {  # run NAME CMD...: tee the output to $OUT/NAME.txt, keep going on failure
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT/$name.txt"
  timeout "${STEP_TIMEOUT:-540}" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}

case "$stage" in
  check)
    # JAX_PLATFORMS=cuda overrides tests/conftest.py's CPU default: the Pallas backend then
    # compiles real kernels (interpret mode is only chosen off a GPU).
    JAX_PLATFORMS=cuda STEP_TIMEOUT=500 run check $py -m pytest -q -p no:cacheprovider --durations=15 \
      tests/test_pallas_4bit.py tests/test_pallas_int8.py tests/test_pallas_optim.py \
      tests/test_ops.py tests/test_interop_bnb.py tests/test_reciprocal.py tests/test_bnb_vectors.py ;;
  bench4)
    STEP_TIMEOUT=420 run bench_4bit $py experiments/bench_4bit.py
    STEP_TIMEOUT=120 run bench_decode $py experiments/bench_decode.py ;;
  bench8)
    STEP_TIMEOUT=360 run bench_int8 $py experiments/bench_int8.py
    STEP_TIMEOUT=180 run bench_optim $py experiments/bench_optim.py ;;
  e2e)
    STEP_TIMEOUT=200 run qlora_1b $py experiments/bench_qlora_step.py --preset 1b --out "$OUT/qlora_1b.json"
    STEP_TIMEOUT=330 run qlora_7b $py experiments/bench_qlora_step.py --preset 7b --batch 1 --out "$OUT/qlora_7b.json" ;;
  load)
    STEP_TIMEOUT=570 run load_20b $py experiments/bench_load.py --preset 20b --dir /tmp/gpt20b --out "$OUT/load_20b.json" ;;
  lease)
    # The most telling subset first, each step capped so the whole stays under ten minutes. The
    # first lease (H100, 2026-11-27) ran only the 4-bit kernel tests and a third of the int8
    # ones in 140 s (Triton compiles), so the questions it left open go first: the XLA path's
    # bytes on the GPU (exact reciprocal, bnb vectors), the optimizer and int8 kernels, then
    # the rest; a test that hangs is cut at 45 s. Then one 8192^2 weight, M=1 first (each
    # bench_4bit cell prints its wall time: M=16 and M=512 did not finish within a minute).
    JAX_PLATFORMS=cuda STEP_TIMEOUT=170 run check $py -m pytest -q -p no:cacheprovider -rf \
      --tb=short --timeout=45 --durations=10 tests/test_reciprocal.py tests/test_bnb_vectors.py \
      tests/test_pallas_optim.py tests/test_pallas_int8.py tests/test_pallas_4bit.py \
      tests/test_ops.py
    STEP_TIMEOUT=130 run bench_4bit $py experiments/bench_4bit.py --m 1 16 512 \
      --shapes 8192x8192 --iters 50 --repeats 3
    STEP_TIMEOUT=70 run bench_optim $py experiments/bench_optim.py --steps 10 --repeats 3
    STEP_TIMEOUT=90 run bench_int8 $py experiments/bench_int8.py --m 1 512 4096 \
      --shapes 8192x8192 --thresholds 6 --fracs 0.01 --iters 50 --repeats 3
    STEP_TIMEOUT=50 run bench_decode $py experiments/bench_decode.py --steps 128 --repeats 2 ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
