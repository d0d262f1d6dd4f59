"""Zero-shot evaluation of a CLIP-mode checkpoint: ``python eval/zeroshot.py --checkpoint CKPT``
(same as ``dino-sparo-zeroshot``)."""

from dino_sparo.cli.zeroshot import main

if __name__ == "__main__":
    main()
