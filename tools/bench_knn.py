"""Benchmark the k-NN search backends on 384-d and 4096-d features: see ``python tools/bench_knn.py --help``."""

from dino_sparo.cli.bench_knn import main

if __name__ == "__main__":
    main()
