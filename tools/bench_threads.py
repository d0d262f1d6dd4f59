"""The demo's training steps alone and beside one other 2-thread CPU job (a matmul loop), under the
default OpenMP wait policy (passive, set by the package) and under ``OMP_WAIT_POLICY=ACTIVE`` (spinning,
the OpenMP runtime's own default before): a table of wall seconds, with the load average beside each.

    python tools/bench_threads.py --steps 80

Each run is ``python -m dino_sparo.cli.train --config configs/dino/demo_fashion_mnist.yaml max_steps=N``
in a fresh output folder; the time is the whole command's (start-up included, the same in every row).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATMUL_JOB = ("import time, torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
              "while True:\n    a @ a\n")


def run_demo(steps: int, policy: str, output_dir: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = str(ROOT)
    config = ROOT / "configs" / "dino" / "demo_fashion_mnist.yaml"
    command = [sys.executable, "-m", "dino_sparo.cli.train", "--config", str(config), f"max_steps={steps}",
               f"output_dir={output_dir}", "eval.knn_every=0"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="demo training steps per run (default: 80)")
    parser.add_argument("--policies", default="default,ACTIVE",
                        help="comma-separated: default (the package's passive wait) and/or OMP_WAIT_POLICY values")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            for beside in (False, True):
                job = None
                if beside:  # the other job: plain torch, its own OpenMP defaults
                    job_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
                    job = subprocess.Popen([sys.executable, "-c", MATMUL_JOB], env=job_env)
                    time.sleep(3)
                load = os.getloadavg()[0]
                try:
                    seconds = run_demo(args.steps, policy, Path(tmp) / f"{policy}_{beside}")
                finally:
                    if job is not None:
                        job.terminate()
                        job.wait()
                rows.append((policy, "beside a 2-thread matmul job" if beside else "alone", seconds, load))
                print(f"{rows[-1][0]:8} {rows[-1][1]:30} {seconds:7.1f} s  (load {load:.2f} at start)",
                      file=sys.stderr, flush=True)
    print(f"{'OMP wait':8} {'condition':30} {'seconds':>8} {'÷ alone':>8} {'load 1 min':>10}")
    for policy, condition, seconds, load in rows:
        alone = next(s for p, c, s, _ in rows if p == policy and c == "alone")
        print(f"{policy:8} {condition:30} {seconds:8.1f} {seconds / alone:7.2f}× {load:10.2f}")


if __name__ == "__main__":
    main()
