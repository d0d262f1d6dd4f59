"""SPARO slot attention pictures of a checkpoint (same as ``dino-sparo-visualize``); see ``--help``."""

from dino_sparo.cli.visualize import main

if __name__ == "__main__":
    main()
