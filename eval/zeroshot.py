"""Zero-shot evaluation of a CLIP-mode checkpoint: ``python eval/zeroshot.py --checkpoint CKPT``
(same as ``dino-sparo-zeroshot``)."""

from dino_sparo.evaluation.zeroshot_cli import main

if __name__ == "__main__":
    main()
