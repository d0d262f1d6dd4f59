"""The recipe search's table for RESULTS.md: one row per run JSON written by tools/recipe_search.sh.

Usage: python tools/recipe_table.py RESULTS_DIR [RESULTS_DIR ...]  (rows by run name: the plans name runs a0, b1, ... in the order they ran)
"""

import json
import sys
from pathlib import Path


def main(argv):
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    runs = [json.loads(path.read_text()) for folder in argv for path in Path(folder).glob("*.json")]
    runs = sorted((run for run in runs if "knn_top1" in run), key=lambda run: run["name"])  # not other JSONs
    print("| run | overrides of the base config | steps | training (min) | teacher entropy / batch-mean entropy at the end (nats) | "
          "k-NN top-1 (k=20, 60k/10k) |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        last = run["last_log"]
        overrides = " ".join(f"`{o}`" for o in run["overrides"]) or "(none)"
        print(f"| {run['name']} | {overrides} | {last['step']} | {run['train_seconds'] / 60:.1f} | "
              f"{last['teacher_entropy']:.2f} / {last['teacher_mean_entropy']:.2f} | {100 * run['knn_top1']:.2f} |")
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
