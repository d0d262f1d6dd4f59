"""CLIP with class-token read-outs vs SPARO on the scene world, several seeds: see ``--help``."""

from dino_sparo.cli.clip_study import main

if __name__ == "__main__":
    main()
