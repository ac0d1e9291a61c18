"""One optimizer step of the product's train_step on fixed real photos; saves the updated weights.

Run with 1 process (batch 2B) and with 2 processes (batch B each, rank r takes half r):
DDP is correct when both give the same parameters. Batch norm runs in eval mode so its
statistics do not depend on the per-process batch.

    python tests/helpers/ddp_step_worker.py OUT.safetensors
    accelerate launch --multi_gpu --num_processes 2 tests/helpers/ddp_step_worker.py OUT.safetensors
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand and tests.helpers

import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import functional as TF

from carbrand.checkpoint import plain_state_dict
from carbrand.config import OptimConfig
from carbrand.model import build_model
from carbrand.train import train_step
from carbrand.training.optimization import build_optimizer
from tests.helpers.paths import SHARED_DATA

GLOBAL_BATCH = 8
CARS5 = SHARED_DATA / "cars5" / "train"


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    brands = sorted(p.name for p in CARS5.iterdir())
    files = [(sorted((CARS5 / b).glob("*.jpg"))[i], label) for i in range(2) for label, b in enumerate(brands)][:GLOBAL_BATCH]
    images = torch.stack([TF.to_tensor(TF.resize(Image.open(f).convert("RGB"), [64, 64])) for f, _ in files])
    return TF.normalize(images, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), torch.tensor([label for _, label in files])


def main(out: str) -> None:
    accelerator = Accelerator(mixed_precision="no")
    torch.manual_seed(0)  # same initial weights on every rank and in both runs
    model = build_model("resnet18", num_classes=5).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", momentum=0.9, weight_decay=1e-4), lr=0.5,
                                device=accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.eval()  # BN uses running statistics: identical whatever the per-process batch
    images, labels = fixed_batch()
    per_rank = GLOBAL_BATCH // accelerator.num_processes
    start = accelerator.process_index * per_rank
    images = images[start:start + per_rank].contiguous(memory_format=torch.channels_last)
    train_step(accelerator, model, optimizer, images, labels[start:start + per_rank], label_smoothing=0.1, grad_clip_norm=0.0)
    if accelerator.is_main_process:
        save_file(plain_state_dict(accelerator.unwrap_model(model)), out)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
