#!/usr/bin/env bash
# One-shot GPU run for a lent H100/H200 (no network; torch + triton + nvcc preinstalled; the repository is
# the current directory). Every step is time-boxed with `timeout`, independent of the others (a failing
# step does not stop the next one), and cut short so that the whole script ends within
# FASTSHARE_SUITE_SECONDS (default 560 s); steps run most-wanted first:
#
#   1. build the extension with CUDA       (pip install --no-build-isolation -e .)        <= 150 s
#   2. steps, ResNet-34: policy (curriculum stage 1 and L), re-train, inference at 321x321, B=16, K=3;
#      sequential vs batched/tree, fp32, tf32 and bf16 + channels_last, eager and graphed  <= 200 s
#   3. GPU tests: the CUDA kernels and executors  (python -m pytest -m gpu tests/)          <=  90 s
#   4. the ResNet-34 policy steps of 2 in fp32 and tf32 once more with cuDNN's algorithm search on
#      (--cudnn-benchmark: a run of its own, cuDNN caches one plan per convolution)        <= 120 s
#   5. Triton tests compiled for the GPU (-m "triton and not gpu"), one fixed configuration
#      per kernel (FASTSHARE_TRITON_AUTOTUNE=0: autotuning every test shape would not fit) <=  90 s
#   6. op benchmarks: the issue-3 target shape [48,256,81,81], every op backend (autotuned) <=  65 s
#      (an H100 took 50 s to write the file, then was cut by the old 50 s limit before it exited)
#   7. the heads' dilated 3x3 convolution split in bands vs padded (bench_pruned_conv.py)  <=  60 s
#   8. steps, ResNet-18 (as 2)                                                             <= 130 s
#   9. op benchmarks at the other ResNet activation shapes + gated blocks                  <=  90 s
#  10. summary table printed last
#
# FASTSHARE_SUITE_ONLY="build steps-resnet34 ..." runs only the named steps (in this order).
#
# Results: "$OUT/<device-slug>-<date>-{steps-resnet34,target,policy-resnet34-cudnn-benchmark,pruned-conv,steps-resnet18,
# op}.json" ($OUT is set by the
# runner; default bench/results); every step's log is appended to "$OUT/gpu_suite.log".
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export FASTSHARE_BUILD_CUDA=1 FASTSHARE_CUDA_ARCHS="${FASTSHARE_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
# On this workplace's CUDA image an extension built with /opt/gcc's g++ crashed whenever a TORCH_CHECK
# message formatted a number (seen 2026-11-26 on an H200); the system libstdc++ fixes it.
if [ -e /lib/x86_64-linux-gnu/libstdc++.so.6 ]; then
    export LD_PRELOAD="/lib/x86_64-linux-gnu/libstdc++.so.6${LD_PRELOAD:+:$LD_PRELOAD}"
fi
status=()

SUITE_SECONDS=${FASTSHARE_SUITE_SECONDS:-560}
LOG="$OUT/gpu_suite.log"
: > "$LOG"

step() {  # step NAME SECONDS COMMAND...: run time-boxed (within the suite's deadline), log, remember rc
    local name=$1 secs=$2; shift 2
    if [ -n "${FASTSHARE_SUITE_ONLY:-}" ] && [[ " $FASTSHARE_SUITE_ONLY " != *" $name "* ]]; then
        return  # not among the steps asked for
    fi
    local left=$((SUITE_SECONDS - SECONDS - 5))
    if [ "$left" -lt 20 ]; then
        echo "=== [$name] skipped: ${left}s left of the suite's ${SUITE_SECONDS}s"
        status+=("$name skipped (no time left)")
        return
    fi
    [ "$secs" -gt "$left" ] && secs=$left
    local t0=$SECONDS
    echo "=== [$name] (limit ${secs}s): $*" | tee -a "$LOG"
    timeout --kill-after=5 "$secs" "$@" > "$OUT/.step.log" 2>&1
    local rc=$?
    cat "$OUT/.step.log" >> "$LOG"
    tail -n 30 "$OUT/.step.log"
    rm -f "$OUT/.step.log"
    echo "=== [$name] rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
    status+=("$name rc=$rc $((SECONDS - t0))s")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step build 150 python3 -m pip install --no-build-isolation --no-deps -e .
python3 -m fastshare.info 2>/dev/null | tail -n 15 || true
DAY=$(date +%F)
SLUG=$(python3 -c "from fastshare.bench import device_slug; print(device_slug('cuda'))" 2>/dev/null || echo cuda)
R="$OUT/$SLUG-$DAY"
step steps-resnet34 200 python3 -m fastshare.bench --device cuda --filter step/resnet34/ --out "$R-steps-resnet34.json"
step tests-gpu 90 env FASTSHARE_REQUIRE_BACKENDS=cpu,cuda,triton python3 -m pytest -m gpu -q -rfE \
    --durations=10 -p no:cacheprovider tests/
step policy-cudnn-benchmark 120 python3 -m fastshare.bench --device cuda --cudnn-benchmark --precisions fp32,tf32 \
    --filter step/resnet34/policy --out "$R-policy-resnet34-cudnn-benchmark.json"
step tests-triton 90 env FASTSHARE_REQUIRE_BACKENDS=cpu,cuda,triton FASTSHARE_TRITON_AUTOTUNE=0 python3 -m pytest \
    -m "triton and not gpu" -q -rfE --durations=10 -p no:cacheprovider tests/
step bench-target 65 python3 -m fastshare.bench --device cuda --filter gr/48x256x81x81 --out "$R-target.json"
step bench-pruned-conv 60 python3 -m pytest bench/bench_pruned_conv.py --benchmark-only -s -q -p no:cacheprovider \
    --benchmark-json "$R-pruned-conv.json"
step steps-resnet18 130 python3 -m fastshare.bench --device cuda --filter step/resnet18/ --out "$R-steps-resnet18.json"
step bench-op 90 python3 -m fastshare.bench --device cuda --filter gr/48x64x81x81 --filter gr/48x128x41x41 \
    --filter gr/48x256x41x41 --filter gr/48x512x41x41 --filter block/ --out "$R-op.json"

echo "=== summary"
printf '%s\n' "${status[@]}"
python3 - "$R-steps-resnet34.json" "$R-target.json" "$R-policy-resnet34-cudnn-benchmark.json" "$R-steps-resnet18.json" \
    "$R-op.json" <<'PY'
"""Short summary: issue-3 targets at [48,256,81,81] and the speed-ups of every other case."""
import json
import sys
from pathlib import Path

for path in map(Path, sys.argv[1:]):
    if not path.exists():
        print(f"{path.name}: missing (its step failed or timed out; see the logs)")
        continue
    doc = json.loads(path.read_text())
    rates = doc["reference_rates"]
    print(f"{path.name}: {doc['device']['name']} commit {doc['git_commit'][:12]}"
          f"{' cuDNN search on' if doc['config'].get('cudnn_benchmark') else ''} copy {rates['copy_gbps']:.0f} GB/s"
          + "".join(f" {d} mm {v:.0f} TFLOP/s" for d, v in rates.get("matmul_tflops", {}).items()))
    for c in doc["config"].get("conv_split", {}).get("choices", []):
        print(f"  heads' conv split: {'SPLIT ' if c['split'] else 'padded'} d={c['dilation']} x={c['x_shape']} "
              f"{c['dtype']} cl={c['channels_last']} backward={c['backward']} tf32={c['tf32']} "
              f"cudnn_search={c.get('cudnn_benchmark')}")
    print(f"{'case':58s} {'median ms':>10s} {'GB/s':>7s} {'%copy':>6s} {'TFLOP/s':>8s} {'x ref':>6s} {'x comp':>6s}  target")
    for c in doc["cases"]:
        target = ""
        if "/48x256x81x81/" in c["name"] and c["variant"] in ("cuda", "triton") and c["pass"] in ("fwd", "bwd"):
            need = 85.0 if c["pass"] == "fwd" else 75.0
            ok = c["status"] == "ok" and c["pct_copy_bw"] is not None and c["pct_copy_bw"] >= need
            target = f">= {need:.0f}%: {'PASS' if ok else 'MISS'}"
        if c["status"] != "ok":
            print(f"{c['name']:58s} {c['status']}: {c['error'][:60]}  {target}")
            continue
        f = lambda v, spec: format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])
        print(f"{c['name']:58s} {c['median_ms']:10.3f} {f(c['gbps'], '7.0f')} {f(c['pct_copy_bw'], '6.1f')} "
              f"{f(c.get('tflops'), '8.1f')} {f(c['vs_reference'], '6.2f')} {f(c['vs_compile'], '6.2f')}  {target}")
PY
