#!/usr/bin/env bash
# The last step of bench/gpu_steps_full.txt: what the steps wrote under $WORK/pack, the ablation's
# results (complete or not) and the step logs so far, as one archive, $OUT/gpu_results.tar.gz.
# SMPLify's JSON is named after the GPU (smplify_h200.json), as bench/results/ names them.
set -u
pack=$WORK/pack
mkdir -p "$pack"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | grep -oiE 'h200|h100|a100|l40s|l4|a10g' | tr '[:upper:]' '[:lower:]')
[ -f "$pack/smplify/smplify_gpu.json" ] && cp "$pack/smplify/smplify_gpu.json" "$pack/smplify_${gpu:-gpu}.json"
if [ -d "$WORK/ablation" ]; then
    mkdir -p "$pack/ablation"
    (cd "$WORK/ablation" && find . -maxdepth 3 \( -name 'ablation.*' -o -name '_SUCCESS.json' -o -name 'config.yaml' \) \
        -exec cp --parents {} "$pack/ablation/" \;)
fi
cp "$OUT"/*.log "$OUT/steps.json" "$pack/" 2>/dev/null
tar -czf "$OUT/gpu_results.tar.gz" -C "$pack" . && tar -tzf "$OUT/gpu_results.tar.gz"
