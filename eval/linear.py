"""Linear-probe evaluation of a checkpoint: ``python eval/linear.py --checkpoint CKPT`` (same as ``dino-sparo-linear``)."""

from dino_sparo.cli.linear import main

if __name__ == "__main__":
    main()
