"""A small ResNet for 32x32 images: a stem, residual stages of two 3x3 convolutions with
BatchNorm each, a shortcut where the shape changes, then pooling and a classifier. Use it as
``--model bpmem.models.resnet:make_resnet --data bpmem.models.resnet:make_batch``.

Shapes: images (B, 3, 32, 32) -> stem (B, W, 32, 32) -> stages, each halving the side and
doubling the channels after the first -> pooled (B, 4W) -> logits (B, classes).
"""

from __future__ import annotations

import torch
from torch import nn

CLASSES = 10


class Residual(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); the shortcut is a strided 1x1
    convolution with BatchNorm where the stage changes shape, else x itself."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def make_resnet(width: int = 16, blocks_per_stage: int = 1, classes: int = CLASSES) -> nn.Sequential:
    """The factory for ``--model``: an ``nn.Sequential``, so checkpointing cuts its children."""
    layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                             nn.ReLU())]
    channels = width
    for stage, out in enumerate((width, 2 * width, 4 * width)):
        for index in range(blocks_per_stage):
            layers.append(Residual(channels, out, 2 if stage and index == 0 else 1))
            channels = out
    layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)))
    return nn.Sequential(*layers)


def make_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): (B, 3, 32, 32) float32 and (B,) int64 in 0..9."""
    return torch.randn(batch_size, 3, 32, 32).to(device), torch.randint(0, CLASSES, (batch_size,)).to(device)
