#!/usr/bin/env bash
# The Fashion-MNIST recipe search behind RESULTS.md: trains each named configuration of a plan file
# (one line each: NAME key.sub=value ...; '#' starts a comment) from one base config, then scores the
# trained teacher by DINO's weighted k-NN (k=20, T=0.07, all 60,000 train images as memory, all 10,000
# test images). Resumable: a run whose result file exists is skipped, and a training that was stopped
# resumes from its checkpoint. Usage:
#   tools/recipe_search.sh PLAN BASE_CONFIG RESULTS_DIR OUTPUT_DIR
# writes RESULTS_DIR/NAME.json (overrides, training seconds, last log row, k-NN) per run and
# RESULTS_DIR/NAME.log (training log).
set -euo pipefail
if [[ $# -ne 4 ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
plan=$1 base=$2 results=$3 outputs=$4
python=${PYTHON:-python}
mkdir -p "$results" "$outputs"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

while read -r name overrides; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    result="$results/$name.json"
    [[ -s "$result" ]] && { echo "== $name: done, skipped"; continue; }
    out="$outputs/$name"
    echo "== $name: $overrides"
    start=$(date +%s)
    # shellcheck disable=SC2086  # the overrides are words on purpose
    "$python" -m dino_sparo.cli.train --config "$base" $overrides "output_dir=$out" >>"$results/$name.log" 2>&1
    train_s=$(( $(date +%s) - start ))
    "$python" eval/knn.py --checkpoint "$out/checkpoint.pth" --ks 20 --temperature 0.07 --no-cache --quiet --batch-size 1000 --num-workers 1 \
        --output-json "$out/knn.json" >>"$results/$name.log" 2>&1
    total_s=$(( $(date +%s) - start ))
    "$python" - "$name" "$overrides" "$train_s" "$total_s" "$out" "$result" "$commit" "$base" <<'PY'
import json, sys
name, overrides, train_s, total_s, out, result, commit, base = sys.argv[1:]
rows = [json.loads(line) for line in open(f"{out}/log.jsonl")]
train_rows = [r for r in rows if "loss" in r]
knn_rows = [r for r in rows if any(k.startswith("knn") for k in r)]
knn = json.load(open(f"{out}/knn.json"))
summary = {"name": name, "overrides": overrides.split(), "base_config": base, "commit": commit,
           "train_seconds": int(train_s), "total_seconds": int(total_s), "last_log": train_rows[-1],
           "knn_during_training": knn_rows, "knn_top1": knn["knn"]["20"]["top1"]}
open(result, "w").write(json.dumps(summary, indent=1))
print(f"== {name}: k-NN top-1 {100 * summary['knn_top1']:.2f} % after {int(train_s) / 60:.1f} min of training")
PY
done < "$plan"
