#!/usr/bin/env bash
# One prepared device check for a session that has an NVIDIA GPU (e.g. one H200).
#
#   OUT=/some/dir scripts/device_check.sh          # from the repository root
#
# Runs, each step time-limited and logged, results under $OUT (default /tmp/hwlayer-device-check):
#   env.txt                      nvidia-smi, torch/triton versions, which optional kernel libraries import
#   hwlayer_info.json            `hwlayer info --json` (which backend detection picks; should be `cuda`)
#   ops_cuda.json                the cuda dispatch plan (native / inherited:triton / generic per op)
#   conformance-cuda.{json,md}   `pytest conformance --backend cuda --report ...`
#   conformance-triton.{json,md} the same for `--backend triton` on the GPU (the Triton kernels compiled,
#                                not interpreted: the first GPU run of the tier)
#   triton-kernels.log           tests/test_triton_kernels.py (interpreter; sanity that the tree is intact)
#   bench-decode-*.log           the model decode benchmark for cuda and cpu, when bench/ has one
#   summary.txt                  one line per step: name, exit status, seconds
# A failing step does not stop the others. Step timeouts add up to 570 s (the device tool allows 600 s
# per command); expected total on an H200 is a few minutes.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hwlayer-device-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset GLM_BACKEND HWLAYER_TRITON TRITON_INTERPRET HWLAYER_STRICT

# A python with a CUDA build of torch: $PY, else the repo venv if its torch sees a GPU, else python3.
if [ -z "${PY:-}" ]; then
    PY=python3
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY=.venv/bin/python
    fi
fi

SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S COMMAND... ; output to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-24s rc=%-4s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >> "$SUMMARY"
    return 0
}

{
    date -u; echo "python: $PY"
    nvidia-smi || echo "nvidia-smi not found"
    "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "hip", torch.version.hip)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device 0", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for mod in ("triton", "flash_mla", "deep_gemm", "vllm._C", "mcoplib", "lightop"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod}: importable {getattr(m, '__version__', '')}")
    except Exception as exc:
        print(f"{mod}: not importable ({type(exc).__name__})")
EOF
} > "$OUT/env.txt" 2>&1

"$PY" -m hwlayer info --json > "$OUT/hwlayer_info.json" 2> "$OUT/hwlayer_info.err"
echo "hwlayer-info             rc=$?" >> "$SUMMARY"
"$PY" -m hwlayer ops --backend cuda --json > "$OUT/ops_cuda.json" 2> "$OUT/ops_cuda.err"
echo "ops-cuda                 rc=$?" >> "$SUMMARY"

step conformance-cuda 180 "$PY" -m pytest -q -p no:cacheprovider conformance --backend cuda \
    --report "$OUT/conformance-cuda.json"
# (EP cases skipped for triton: the tier has no collectives, they would rerun the cuda run's generic ones)
step conformance-triton 150 "$PY" -m pytest -q -p no:cacheprovider conformance --backend triton -k "not ep_" \
    --report "$OUT/conformance-triton.json"
step triton-kernels 60 env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py

# Model decode benchmark (bench/ is written by another part of the project): run the first decode
# benchmark found, on cuda and on cpu, so docs/benchmarks.md can record the ratio from one run.
BENCH=$(ls bench/*decode*.py 2>/dev/null | head -n 1)
if [ -n "$BENCH" ]; then
    step bench-decode-cuda 60 env GLM_BACKEND=cuda "$PY" "$BENCH" ${BENCH_ARGS:-}
    step bench-decode-triton 60 env GLM_BACKEND=triton "$PY" "$BENCH" ${BENCH_ARGS:-}
    step bench-decode-cpu 60 env GLM_BACKEND=cpu "$PY" "$BENCH" ${BENCH_ARGS:-}
else
    # No decode benchmark in bench/: time greedy decoding of the tiny checkpoint directly (the same
    # model API the server uses), after one warm-up generation, per backend.
    for backend in cuda triton cpu; do
        step "decode-tiny-$backend" 60 "$PY" - "$backend" "$OUT/decode-tiny-$backend.json" <<'EOF'
import json, sys, time, torch
from model import load_model
from model.generate import generate
from model.tiny import ensure_default_model
backend, out = sys.argv[1], sys.argv[2]
m = load_model(ensure_default_model(), backend=backend)
device = m.plan.device
prompt = [[(7 * i) % 400 + 20 for i in range(64)] for _ in range(4)]
generate(m, prompt, max_new_tokens=8, stop_at_eos=False)  # warm-up: Triton compilation, allocator
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
sync(); t0 = time.perf_counter()
generate(m, prompt, max_new_tokens=64, stop_at_eos=False)
sync(); secs = time.perf_counter() - t0
result = {"backend": backend, "device": str(device), "batch": 4, "prompt_tokens": 64,
          "new_tokens": 64, "seconds": secs, "tokens_per_s": 4 * 64 / secs}
json.dump(result, open(out, "w"), indent=2); print(result)
EOF
    done
fi

cat "$SUMMARY"
