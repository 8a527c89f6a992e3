#!/usr/bin/env bash
# Run spin-pipeline's steps on a bare GPU machine (Python 3.12 with PyTorch, no Ray, smplx, roma
# or MLflow, no network), from the bundle that bench/gpu_bundle.sh builds here.
#
#   here:   bench/gpu_bundle.sh                 # writes .gpu/bundle.tar.xz (git-ignored, < 60 MB)
#   there:  run(carry=[".gpu"], timeout_s=600, command="bash bench/gpu_run.sh")
#           run(carry=[".gpu"], timeout_s=600, command="GPU_RUN_BUDGET=560 bash bench/gpu_run.sh bench/my_steps.txt")
#
# STEPS (default bench/gpu_steps.txt, the smoke steps): one step a line, `NAME BUDGET_S COMMAND...`;
# COMMAND runs in bash from the repo root; blank and '#' lines are skipped. Each step runs under
# `timeout` with its budget, cut to what is left of GPU_RUN_BUDGET (seconds for the whole run,
# default 540, the unpack included); a failed step does not stop the next, one with under 5 s left
# is skipped. Results: $OUT/NAME.log (its output) and $OUT/steps.json (rc and seconds per step,
# rewritten after each). Only 8 files come back from $OUT, so past that the logs are packed into
# $OUT/logs.tar.gz; steps copy what else they want back into $OUT themselves.
# A step sees: SITE (the unpacked bundle), WORK (scratch, emptied first), OUT, `spin-pipeline` on
# PATH (the repo is not installed: python3 -m pipeline.cli), PYTHONPATH=$SITE:repo, Ray without
# usage stats on loopback, EXPECT_GPU (default 1: gpu_smoke.py's CUDA checks fail without a GPU; 0 on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STEPS=${1:-bench/gpu_steps.txt}
BUNDLE=${GPU_BUNDLE:-.gpu/bundle.tar.xz}
BUDGET=${GPU_RUN_BUDGET:-540}
OUT=${OUT:-/tmp/gpu_out}
UNPACK_TO=${GPU_UNPACK_TO:-/tmp}  # the bundle holds site/ and site-fallback/
export OUT SITE=$UNPACK_TO/site SITE_FALLBACK=$UNPACK_TO/site-fallback WORK=${WORK:-/tmp/gpu_work}
export EXPECT_GPU=${EXPECT_GPU:-1}
START_NS=$(date +%s%N)
elapsed() { echo $(( ($(date +%s%N) - START_NS) / 1000000 )); }  # milliseconds

mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK/bin" "$WORK/meta"
[ -f "$STEPS" ] || { echo "error: no steps file $STEPS"; exit 2; }
[ -f "$BUNDLE" ] || { echo "error: no bundle at $BUNDLE: build it here with bench/gpu_bundle.sh, carry .gpu"; exit 2; }

TSV=$WORK/steps.tsv
write_json() {  # steps.json from the rows so far
    python3 - "$TSV" "$OUT/steps.json" "$BUDGET" "$(elapsed)" <<'EOF'
import json, sys
rows, out, budget, ms = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
steps = {}
for line in open(rows):
    name, rc, ms_taken, step_budget, command = line.rstrip("\n").split("\t", 4)
    steps[name] = {"rc": int(rc) if rc.isdigit() else rc, "seconds": int(ms_taken) / 1000,
                   "budget_s": float(step_budget), "command": command}
json.dump({"budget_s": budget, "elapsed_s": ms / 1000, "steps": steps}, open(out, "w"), indent=2)
EOF
}
record() {  # NAME RC MILLISECONDS BUDGET_S COMMAND
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$TSV"
    write_json
}

# The bundle: unpacked fresh each run (a warm machine keeps /tmp, a fresh one is bare).
t0=$(elapsed)
rm -rf "$SITE" "$SITE_FALLBACK"
mkdir -p "$UNPACK_TO" && tar -xJf "$BUNDLE" -C "$UNPACK_TO" >"$OUT/unpack.log" 2>&1
rc=$?
record unpack "$rc" $(( $(elapsed) - t0 )) 0 "tar -xJf $BUNDLE -C $UNPACK_TO"
[ "$rc" = 0 ] || { cat "$OUT/unpack.log"; exit 1; }

# spin-pipeline without installing the repo: a wrapper on PATH, and the distribution's metadata
# (the code asks for its own version).
version=$(sed -n 's/^version *= *//p' setup.cfg)
mkdir -p "$WORK/meta/spin_pipeline-$version.dist-info"
printf 'Metadata-Version: 2.1\nName: spin-pipeline\nVersion: %s\n' "$version" \
    >"$WORK/meta/spin_pipeline-$version.dist-info/METADATA"
printf '#!/usr/bin/env bash\nexec python3 -m pipeline.cli "$@"\n' >"$WORK/bin/spin-pipeline"
chmod +x "$WORK/bin/spin-pipeline"
export PATH=$WORK/bin:$PATH
export PYTHONPATH=$SITE:$REPO:$WORK/meta${PYTHONPATH:+:$PYTHONPATH}
# A fallback goes first only where the image's own version falls short of a bundled requirement.
fallbacks=$(python3 bench/gpu_smoke.py fallbacks) || { echo "error: gpu_smoke.py fallbacks failed"; exit 1; }
[ -n "$fallbacks" ] && export PYTHONPATH=$fallbacks:$PYTHONPATH && echo "fallbacks in use: $fallbacks"

# Ray local-only: no usage stats, and its node on loopback (Ray's switch for that is named
# after Windows and macOS, where loopback is its default); its token authentication stays on.
export RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

exec 3<"$STEPS"
while read -r -u 3 name step_budget command; do
    case "$name" in ''|'#'*) continue ;; esac
    if ! [[ $step_budget =~ ^[0-9]+$ ]] || [ -z "$command" ]; then
        echo "== $name: not a step line (NAME BUDGET_S COMMAND...)"
        record "$name" bad-line 0 0 "$step_budget $command"
        continue
    fi
    left=$(( BUDGET - $(elapsed) / 1000 ))
    limit=$(( step_budget < left ? step_budget : left ))
    if [ "$limit" -lt 5 ]; then
        echo "== $name: skipped, ${left}s of the budget left"
        record "$name" skipped 0 "$step_budget" "$command"
        continue
    fi
    echo "== $name (${limit}s): $command"
    t0=$(elapsed)
    timeout --kill-after=10 "$limit" bash -c "$command" </dev/null >"$OUT/$name.log" 2>&1
    rc=$?
    ms=$(( $(elapsed) - t0 ))
    record "$name" "$rc" "$ms" "$limit" "$command"
    echo "   rc=$rc after $(( ms / 1000 )).$(( ms % 1000 / 100 ))s"
    [ "$rc" = 0 ] || tail -n 25 "$OUT/$name.log" | sed 's/^/   | /'
done

if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
    (cd "$OUT" && tar -czf logs.tar.gz ./*.log && rm -f ./*.log)
fi
write_json
python3 -c "
import json; d = json.load(open('$OUT/steps.json'))
print(f\"steps: {d['elapsed_s']:.1f}s of {d['budget_s']:.0f}s\")
for name, s in d['steps'].items(): print(f\"  {name:<14} rc={s['rc']!s:<8} {s['seconds']:7.1f}s\")
"
python3 -c "import json, sys; d = json.load(open('$OUT/steps.json')); sys.exit(any(s['rc'] != 0 for s in d['steps'].values()))"
