#!/usr/bin/env bash
# SMPLify's GPU checks as one script for a GPU machine (about 2-3 minutes on an H100/H200):
#   1. the GPU-only tests: the fixed-shape fit never synchronises (CUDA sync debug mode), a
#      recorded CUDA graph equals the unrecorded fit at several padded batch sizes, a single
#      sample is routed to the CPU and says so, the GPU fit matches the CPU's;
#   2. bench/smplify.py on the GPU at batch 16384, 1, 64, 4096 and 65536 (in that order, so that
#      the target size runs first), every LM mode (auto, dynamic, static, graph), the first 4096
#      people fitted on the CPU beside it (equal_quality) and the CPU's own LM speed at batch 1
#      and 64 (vs_cpu), with a time budget;
#   3. a short summary of 2 from its JSON;
#   4. if less than 190 s have passed: the CUDA kernels of one recorded fit at batch 16384 by
#      total time (torch.profiler), to tell where the time goes.
# Run from anywhere, with smplx and roma importable (PYTHONPATH=/tmp/site:$PWD where a bundle is
# unpacked there). Writes under $OUT (default ./out): nvidia-smi.txt, tests.txt,
# smplify_gpu.json (rewritten after every batch size), bench_log.txt, summary.txt, kernels.txt. Every step has
# its own time limit and a failing step does not stop the next; the exit status is the first
# failure's.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
began=$SECONDS
status=0
step() { echo "== [$((SECONDS - began)) s] $*"; }
keep() { [ "$status" -ne 0 ] || status=$1; }

step "device and imports"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
timeout 30 python3 -c "import torch, smplx, roma; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
keep $?

step "GPU-only tests (limit 70 s)"
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_static_fit.py tests/test_fast_smplify.py \
    -k "gpu or graph or cuda" -rs 2>&1 | tee "$OUT/tests.txt" | tail -n 30
keep "${PIPESTATUS[0]}"

step "bench/smplify.py on the GPU (no batch size starts after 85 s; limit 130 s)"
timeout 130 python3 bench/smplify.py --device cuda --batches 16384,1,64,4096,65536 --repeats 2,5,3,2,1 \
    --lm-modes auto,dynamic,static,graph --adam-batches '' --spin-batches '' --converged-batch 0 \
    --forward-batches '' --quality-people 4096 --cpu-baseline-batches 1,64 --budget-s 85 \
    --out "$OUT/smplify_gpu.json" 2>&1 >/dev/null | tee "$OUT/bench_log.txt" | cut -c1-240
keep "${PIPESTATUS[0]}"

step "summary"
timeout 20 python3 - "$OUT/smplify_gpu.json" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
report = json.load(open(sys.argv[1]))
print(report["machine"]["device_name"], "torch", report["machine"]["torch"], "cpu threads", report["machine"]["torch_threads"])
print(f"{'batch':>6} {'init':>4} {'arm':>10} {'mode':>8} {'device':>6} {'fits/s':>10} {'first call s':>12} {'loss':>7} {'valid':>6} {'PA mm':>6} {'iter':>5}")
for r in report["fits"] + report["cpu_fits"]:
    print(f"{r['batch']:>6} {r['init']:>4} {r['solver']:>10} {r['mode']:>8} {r['fit_device']:>6} {r['fits_per_s']:>10.1f} "
          f"{r.get('first_call_seconds', ''):>12} {r['loss_mean']:>7.3f} {r['valid_fraction']:>6.4f} {r['pa_mpjpe_mm']:>6.1f} "
          f"{r['iterations_mean']:>5.1f}")
print("equal quality (GPU arm - CPU default, same people):")
for q in report["equal_quality"]:
    print(f"  {q['batch']:>6} {q['init']:>4} {q['arm']:>10}: people {q['people']} loss {q['loss_mean_diff']:+.3f} "
          f"valid {q['valid_fraction_diff']:+.4f} PA {q['pa_mpjpe_diff_mm']:+.1f} mm, max |loss diff| {q['loss_max_abs_diff']}, "
          f"same validity {q['same_validity_fraction']}, same steps {q['same_iterations_fraction']}")
for entry in report["vs_cpu"] + report["graph_vs_eager"]:
    print(" ", entry)
graph = [r for r in report["fits"] if r["solver"] == "lm_graph" and r["batch"] >= 16384]
for r in graph:
    print(f"target: {r['fits_per_s']:.0f} fits/s at batch {r['batch']} ({r['init']}), >= 100000: {r['fits_per_s'] >= 1e5}")
print("errors:", report["errors"], "skipped:", report["skipped"], "graphs recorded:", report["graphs_recorded"])
EOF
keep "${PIPESTATUS[0]}"
if [ $((SECONDS - began)) -lt 190 ]; then
    step "kernels of one recorded fit at batch 16384 (limit 40 s)"
    timeout 40 python3 - <<'EOF' 2>&1 | tee "$OUT/kernels.txt" | cut -c1-200
import sys
import torch
sys.path[:0] = [".", "bench"]
from fitting.body_model import load_body_model
from fitting.priors import load_prior
from fitting.smplify import Smplify, SmplifyConfig
from smplify import make_people  # bench/smplify.py
model, prior = load_body_model(device="cuda"), load_prior(device="cuda")
keypoints = make_people(model, 16384, 1000, 2.0, 0.1, "cuda")["keypoints"]
fitter = Smplify(model, prior, SmplifyConfig(mode="graph"))
fitter(keypoints)
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
    fitter(keypoints)
    torch.cuda.synchronize()
print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
EOF
    keep "${PIPESTATUS[0]}"
else
    step "kernels: skipped (time)"
fi
step "done, status $status"
exit "$status"
