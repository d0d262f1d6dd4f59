"""k-NN evaluation of a checkpoint: ``python eval/knn.py --checkpoint CKPT`` (same as ``dino-sparo-knn``)."""

from dino_sparo.evaluation.knn_cli import main

if __name__ == "__main__":
    main()
