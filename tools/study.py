"""DINO with a class-token vs a SPARO read-out on Fashion-MNIST, several seeds: see ``--help``."""

from dino_sparo.cli.study import main

if __name__ == "__main__":
    main()
