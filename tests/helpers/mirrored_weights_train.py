"""Test-only wrapper: run the trainer with torchvision's ImageNet weights for one architecture served elsewhere.

    CARBRAND_TEST_WEIGHTS_URL=resnet18=http://127.0.0.1:PORT/resnet18-1a2b3c4d.pth \
        accelerate launch ... tests/helpers/mirrored_weights_train.py --config ... model.pretrained=imagenet

Each rank is a real training process; the only change is the URL torchvision's weights enum
gives for that architecture (a mirror, as a site without internet access would set up). The
product code runs unchanged: cache folder, once-per-node download and hash check included.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed

import torchvision  # noqa: E402

from carbrand import train  # noqa: E402


def main() -> int:
    arch, url = os.environ["CARBRAND_TEST_WEIGHTS_URL"].split("=", 1)
    torchvision.models.get_model_weights(arch).DEFAULT.value.url = url
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
