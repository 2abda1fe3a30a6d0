"""A seeded ResNet18 that tells images apart, built offline for tests that compare answers.

Plain seeded random weights give almost every image the same class, so "the same top-1"
proves nothing. Recomputing BatchNorm statistics on real photos and standardising the
features that enter ``fc`` makes the logits vary strongly from image to image, while the
network stays a stock torchvision ResNet18 that loads from a state dict.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from tests import images

NUM_CLASSES = 1000
FEATURES = 512
CALIBRATION_CROPS_PER_PHOTO = 24
CALIBRATION_BATCH_SIZE = 32
# Standardised features have unit variance per dimension; this spreads the logits to a
# standard deviation of about 4, so softmax scores are neither flat nor all 1.0.
LOGIT_SCALE = 4.0


def calibration_inputs(
    paths: Sequence[Path], *, crops_per_photo: int = CALIBRATION_CROPS_PER_PHOTO, seed: int = 0
) -> torch.Tensor:
    """Random crops, flips and scales of the photos, through torchvision's own transforms.

    Returns:
        A float tensor of shape (len(paths) * crops_per_photo, 3, 224, 224).
    """
    rng = random.Random(seed)
    transform = ResNet18_Weights.IMAGENET1K_V1.transforms()
    inputs = []
    for path in paths:
        photo = images.photo(path)
        for _ in range(crops_per_photo):
            crop = random_crop(photo, rng, min_area=0.15, max_area=1.0)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            longer_side = rng.randint(160, 640)
            scale = longer_side / max(crop.size)
            crop = crop.resize(
                (max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                Image.Resampling.BICUBIC,
            )
            inputs.append(transform(crop))
    return torch.stack(inputs)


def random_crop(
    image: Image.Image,
    rng: random.Random,
    *,
    min_area: float,
    max_area: float,
    min_aspect: float = 0.5,
    max_aspect: float = 2.0,
) -> Image.Image:
    """A crop covering a random share of the image's area with a random aspect ratio."""
    width, height = image.size
    area = width * height * rng.uniform(min_area, max_area)
    aspect = rng.uniform(min_aspect, max_aspect)
    crop_w = min(width, max(8, round((area * aspect) ** 0.5)))
    crop_h = min(height, max(8, round((area / aspect) ** 0.5)))
    left = rng.randint(0, width - crop_w)
    top = rng.randint(0, height - crop_h)
    return image.crop((left, top, left + crop_w, top + crop_h))


def discriminative_resnet18(paths: Sequence[Path], *, seed: int = 0) -> nn.Module:
    """A ResNet18 (1000 classes, eval mode) whose top-1 differs widely across images.

    Built deterministically from ``seed`` and the photos: seeded random weights, BatchNorm
    statistics recomputed on crops of the photos, and an ``fc`` layer that standardises
    its input features before a seeded random projection.
    """
    calibration = calibration_inputs(paths, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = resnet18(num_classes=NUM_CLASSES)
        projection = torch.randn(NUM_CLASSES, FEATURES) * (LOGIT_SCALE / FEATURES**0.5)
        offset = torch.randn(NUM_CLASSES) * 0.1
    _recompute_batchnorm(network, calibration)
    _standardise_fc(network, calibration, projection, offset)
    return network.eval()


@torch.no_grad()
def _recompute_batchnorm(network: nn.Module, calibration: torch.Tensor) -> None:
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            # momentum=None: a cumulative average over every calibration batch.
            module.momentum = None
            module.reset_running_stats()
    network.train()
    for batch in calibration.split(CALIBRATION_BATCH_SIZE):
        network(batch)
    network.eval()


@torch.no_grad()
def _standardise_fc(
    network: nn.Module, calibration: torch.Tensor, projection: torch.Tensor, offset: torch.Tensor
) -> None:
    fc = network.fc
    assert isinstance(fc, nn.Linear)
    network.fc = nn.Identity()
    try:
        features = torch.cat(
            [network(batch) for batch in calibration.split(CALIBRATION_BATCH_SIZE)]
        )
    finally:
        network.fc = fc
    mean = features.mean(dim=0)
    # A feature that never varies on the photos carries no information; keep it harmless.
    std = features.std(dim=0).clamp_min(1e-3)
    weight = projection / std
    fc.weight.copy_(weight)
    fc.bias.copy_(offset - weight @ mean)
