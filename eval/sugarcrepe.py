"""SugarCrepe of a CLIP-mode checkpoint: ``python eval/sugarcrepe.py --checkpoint CKPT --data DIR --images DIR``
(same as ``dino-sparo-sugarcrepe``)."""

from dino_sparo.cli.sugarcrepe import main

if __name__ == "__main__":
    main()
