"""Benchmark DINO training steps against the reference DINO step: see ``dino-sparo-bench --help``."""

from dino_sparo.cli.bench import main

if __name__ == "__main__":
    main()
