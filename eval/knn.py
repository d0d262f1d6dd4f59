"""k-NN evaluation of a checkpoint: ``python eval/knn.py --checkpoint CKPT`` (same as ``dino-sparo-knn``)."""

from dino_sparo.cli.knn import main

if __name__ == "__main__":
    main()
