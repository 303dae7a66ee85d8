#!/usr/bin/env bash
# The GPU check: GPU tests, then the GPU benchmark rows, in one call of at most 8 minutes.
#
#   on a machine with pip access, once (optional: diffusers for the tiny-Flux offload round trip):
#     bash scripts/gpu_check.sh --fetch-wheels        # wheels into .whl/ (git-excluded: .git/info/exclude)
#   on the GPU machine, from the repository root (Python 3.12, torch + CUDA, triton, transformers, onnxruntime):
#     bash scripts/gpu_check.sh                       # logs and CSV under $OUT (default /tmp/fastenc-gpu-check)
#   through the workplace's device tool, .whl/ travels only when the run names it in carry:
#     run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Steps, each under its own time limit taken from what is left of the total (GPU_CHECK_SECONDS, default 470):
#   1. environment: GPU, driver, versions; a 1-second smoke run of one compiled kernel
#   2. GPU tests (at most 140 s): tests/test_kernels.py at L = 77/333/512 in fp32/fp16/bf16 (+ the whole-model
#      and graph tests), tests/test_device_follow.py (graphs after .to, invalidation, threads/streams, offload
#      round trip in a tiny Flux pipeline when diffusers is importable), tests/test_gpu_first_contact.py,
#      tests/test_tuning_cache.py and tests/test_gpu_hot_path.py (no host sync per call); kernels compile one config each (FASTENC_AUTOTUNE=0: nothing is autotuned
#      here; the offline compile checks are left to CI). At the limit pytest gets SIGINT, so it still writes its summary and $OUT/gpu_tests.xml. TensorRT
#      is not on that machine: its runner's logic is tested on the CPU only (tests/test_tensorrt.py)
#   3. python -m bench.gpu (the rest): every candidate at B = 1, L = 512 first (fastenc triton + CUDA graphs,
#      torch eager bf16, T5-XXL eager bf16, torch.compile max-autotune with up to 240 s), then B = 1/8,
#      L = 77/512, then ONNX Runtime CPU with what is left; CSV to $OUT/gpu-<gpu>.csv (commit it as
#      bench/results/gpu-<gpu>.csv), the summary against the targets last.
#   4. python -m bench.umt5 --device cuda (at most 80 s, kept from step 3): Wan's umT5-XXL (4 of its 24 layers,
#      scaled to all) against the base-size umT5 student, transformers and fastenc triton, bf16; CSV to
#      $OUT/umt5-gpu.csv (its rows go to bench/results/umt5.csv).
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    mkdir -p .whl
    for spec in diffusers==0.42.1 importlib_metadata==8.7.0; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$spec" || { echo "gpu_check: could not download $spec"; exit 1; }
    done
    ls -l .whl
    exit 0
fi

OUT=${OUT:-/tmp/fastenc-gpu-check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
TOTAL=${GPU_CHECK_SECONDS:-470}
START=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
# limit for a step: at most $1 seconds, and never past the total minus $2 seconds kept for later steps
limit() { local l; l=$(( $(left) - $2 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 10 ] && l=10; echo "$l"; }

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/fastenc-triton-cache} FASTENC_CACHE_DIR=/tmp/fastenc-cache
unset TRITON_INTERPRET  # the interpreter never runs CUDA tensors (fastenc refuses to)

# carried wheels (pure Python: diffusers + importlib_metadata); everything else is the machine's own
if ls .whl/*.whl >/dev/null 2>&1; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
        say "installed carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
        say "could not install the carried wheels in .whl/; going on without them"
    fi
fi
if ! $PY -c "import diffusers" >/dev/null 2>&1; then
    say "diffusers is not importable here: the tiny-Flux offload round trip is skipped (carry .whl from --fetch-wheels)"
fi

say "1. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
$PY - <<'EOF' || { say "torch/triton/CUDA are not usable here; stopping"; exit 1; }
import sys, torch, triton, time
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| triton", triton.__version__, "| gpus", torch.cuda.device_count())
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print("gpu 0:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
from fastenc.kernels import rms_norm
t = time.perf_counter()
x = torch.randn(8, 768, device="cuda", dtype=torch.bfloat16); w = torch.ones(768, device="cuda", dtype=torch.bfloat16)
y = rms_norm.rms_norm(x, w, 1e-6); torch.cuda.synchronize()
ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
print(f"smoke: compiled rms_norm in {time.perf_counter() - t:.1f} s, max abs err {float((y.float() - ref.float()).abs().max()):.2e}")
EOF

say "2. GPU tests"
T=$(limit 140 300)
workers=$($PY -c "import os; print(max(1, min(6, (os.cpu_count() or 2) // 2)))")
xdist=""
$PY -c "import xdist" >/dev/null 2>&1 && xdist="-n $workers"
FASTENC_AUTOTUNE=0 timeout -s INT -k 20 "$T" $PY -m pytest -q -rs $xdist -p no:cacheprovider --timeout 90 --junitxml="$OUT/gpu_tests.xml" tests/test_kernels.py tests/test_device_follow.py tests/test_gpu_first_contact.py tests/test_tuning_cache.py tests/test_gpu_hot_path.py -k "(not (test_add_rms_norm or test_gated_ffn or test_linear_relu or test_attention_fp32) or 77 or 333 or 512) and not (every_config or compile_matrix or spill)" > "$OUT/gpu_tests.log" 2>&1
status=$?
tail -n 40 "$OUT/gpu_tests.log"
[ "$status" -eq 124 ] && say "GPU tests stopped at their ${T} s limit (pytest was interrupted; $OUT/gpu_tests.xml has what ran)"
say "GPU tests exit status: $status"

say "3. benchmark (bench/gpu.py)"
T=$(limit 400 85)
B=$(( T - 15 ))
timeout -k 10 "$T" $PY -m bench.gpu --out-dir "$OUT" --reps 30 --warmup 5 --time-limit "$B" \
    --compile-budget 240 --ort-budget 60 2>&1
status=$?
[ "$status" -eq 124 ] && say "benchmark stopped at its ${T} s limit"
say "benchmark exit status: $status"

say "4. Wan's text stage (bench/umt5.py)"
T=$(limit 80 5)
timeout -k 10 "$T" $PY -m bench.umt5 --device cuda --teacher-layers 4 --backends transformers,triton --reps 10 \
    --max-seconds 15 --csv "$OUT/umt5-gpu.csv" 2>&1
status=$?
[ "$status" -eq 124 ] && say "bench.umt5 stopped at its ${T} s limit"
say "bench.umt5 exit status: $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
say "done in $(( $(date +%s) - START )) s"
