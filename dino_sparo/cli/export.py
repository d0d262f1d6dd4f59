"""``dino-sparo-export``: a run's backbone (a DINO run's teacher, a CLIP run's image tower) as a
plain timm-compatible weights file (the work: :mod:`dino_sparo.export`)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from dino_sparo.cli.common import HelpFormatter, run_program
from dino_sparo.evaluation.inputs import CHECKPOINT_KEYS
from dino_sparo.export import FORMATS, export_backbone
from dino_sparo.runtime import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-export",
        description="Write a run's backbone as a plain state dict in timm's names (safetensors when installed, "
                    "else .pth), with a JSON file beside it giving timm's constructor arguments. timm's "
                    "VisionTransformer(**timm_kwargs) loads it strictly; model.pretrained and the evaluation "
                    "programs' --weights load it too. A SPARO read-out is not part of timm's ViT: it is left out "
                    "unless --with-readout (the trunk keeps the run's depth: SPARO runs drop their last block).",
        epilog="Examples:\n"
               "  dino-sparo-export --checkpoint output/demo_fashion_mnist/checkpoint.pth\n"
               "  dino-sparo-export --checkpoint CKPT --output vit_s16_dino_sparo.safetensors\n"
               "  dino-sparo-knn --weights vit_s16_dino_sparo.safetensors --dataset imagefolder --data-path DATA\n"
               "  python -c \"import json, timm, safetensors.torch as st; "
               "d = json.load(open('teacher_backbone.json')); "
               "m = timm.models.vision_transformer.VisionTransformer(**d['timm_kwargs']); "
               "m.load_state_dict(st.load_file(d['weights']))\"",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth written by dino-sparo-train")
    parser.add_argument("--key", default="auto", choices=CHECKPOINT_KEYS,
                        help="which network: auto is a DINO run's teacher (what DINO releases), a CLIP run's image "
                             "tower")
    parser.add_argument("--output", metavar="FILE",
                        help="the weights file; its suffix (.safetensors or .pth) sets the format under --format auto "
                             "(default: KEY_backbone.safetensors, or .pth without safetensors, beside the checkpoint)")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="auto: from --output's suffix, else safetensors when installed, else pth")
    parser.add_argument("--with-readout", action="store_true",
                        help="also write the SPARO read-out (sparo.* keys): then dino_sparo loads the whole network "
                             "(model.pretrained, --weights with --config), but timm's strict load refuses the extra "
                             "keys")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` does with parsed options: write the files, print their description."""
    info = export_backbone(args.checkpoint, args.output, args.key, args.format, args.with_readout)
    print(json.dumps({k: v for k, v in info.items() if k != "model_config"}, indent=2))
    return info


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    run_program("dino-sparo-export", lambda: run(args))


if __name__ == "__main__":
    main()
