"""Why that brand? A Grad-CAM overlay per photo: the heat map of the brand's evidence drawn on the photo.

    carbrand explain --checkpoint runs/cars/best photo.jpg other.jpg --out overlays/     # the top-1 brand
    carbrand explain --checkpoint runs/cars/best photos/ --brand bmw --out overlays/    # where it sees a bmw

For each photo, OUT/<name>.gradcam.png (<name>-2.gradcam.png, ... when names repeat): the photo
with the heat map over the part the model sees (the eval centre crop, outlined), the rest
dimmed. The map is computed in the eval preprocessing's geometry (see carbrand/inference/gradcam.py).
A photo that cannot be read is one error line naming it; the others still get their
overlays, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from carbrand.command_line import run_command_module
from carbrand.errors import UsageError
from carbrand.inference.overlays import write_overlays
from carbrand.inference.predict import Predictor, image_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="an export directory (RUN/best)")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PHOTO", help="image files and/or folders (scanned recursively)")
    parser.add_argument("--brand", default=None, help="explain this brand instead of each photo's top-1 brand")
    parser.add_argument("--out", type=Path, required=True, help="folder for the overlay PNGs (created)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, precision="no")
    if args.brand is not None and args.brand not in predictor.classes:
        raise UsageError(f"--brand {args.brand!r} is not a brand this model knows ({', '.join(predictor.classes)})")
    files, errors = image_files(args.paths)
    written, failed = write_overlays(predictor, files, args.out, args.brand)
    for path, overlay in zip(files, written):
        if overlay is not None:
            print(f"{path}: {overlay}")
    for error in errors + failed:
        print(f"carbrand explain: error: {error['path']}: {error['error']}", file=sys.stderr)
    return 1 if errors or failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_command_module("explain", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
