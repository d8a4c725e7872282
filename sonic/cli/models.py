"""The model files: `python -m sonic download` (from the Hub, verified) and `python -m sonic convert` (safetensors
twins of the pickled weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..exits import EXIT_OK
from . import DefaultsShown


def add_parsers(sub) -> None:
    dl = sub.add_parser(
        "download", formatter_class=DefaultsShown, help="fetch the model files into the README's layout, verified",
        description="Download the model files from the Hugging Face Hub (HF_ENDPOINT and HF_TOKEN honoured) into "
                    "the README's layout, check each against the hub's size and hash and every component against "
                    "Sonic's networks. Files already there are not fetched again.")
    dl.add_argument("--models", required=True, type=Path, help="models folder to fill (e.g. ComfyUI/models/sonic)")
    dl.add_argument("--only", action="append", metavar="PART", help="only these components, comma separated or "
                    "repeated: sonic, whisper, svd, rife, yolo (default: all; with ComfyUI's SVD checkpoint "
                    "connected to the loader, svd is not needed)")
    dl.add_argument("--fp16", action="store_true", help="SVD's half-precision VAE and CLIP files (half the size; "
                    "what GPUs compute in anyway)")

    dl.set_defaults(run=download)

    conv = sub.add_parser("convert", help="write .safetensors twins of the pickled Sonic and RIFE weights",
                          formatter_class=DefaultsShown)
    conv.add_argument("--models", required=True, type=Path)
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(run=convert)


def download(args: argparse.Namespace) -> int:
    from ..engine import download as dl
    from ..engine.checkpoints import ModelLayout

    components = dl.parse_only(args.only)
    fetched = dl.download(args.models, components, fp16=args.fp16)
    kept = sum(not f.downloaded for f in fetched)
    print(f"{len(fetched) - kept} files downloaded, {kept} already there; verified: {', '.join(components)}")
    missing = ModelLayout(args.models).missing(interpolation=True, svd_weights=True)
    if not missing:
        print(f"next: python -m sonic generate --models {args.models} --image PORTRAIT --audio SPEECH --out out.mp4")
    elif not ModelLayout(args.models).missing(interpolation=True, svd_weights=False):
        print("ready for ComfyUI with an SVD checkpoint's VAE and CLIP_VISION connected to Sonic Model Loader; "
              "for the command line also: python -m sonic download --models " + str(args.models) + " --only svd")
    else:
        print("still missing: " + "; ".join(missing))

    return EXIT_OK


def convert(args: argparse.Namespace) -> int:
    from ..engine.checkpoints import convert_to_safetensors

    written = convert_to_safetensors(args.models, overwrite=args.overwrite)
    print("\n".join(str(p) for p in written) or "nothing to convert")
    return EXIT_OK
