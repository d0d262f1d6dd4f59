"""Benchmark DINO's multi-crop data pipeline against DINO v1's, per CPU core: see ``python tools/bench_loader.py --help``
(the same as ``dino-sparo-bench loader``)."""

from dino_sparo.cli.bench_loader import main

if __name__ == "__main__":
    main()
