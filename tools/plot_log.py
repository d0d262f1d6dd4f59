"""Training curves of one or several ``log.jsonl`` files as one PNG; see ``--help``."""

from dino_sparo.cli.plot_log import main

if __name__ == "__main__":
    main()
