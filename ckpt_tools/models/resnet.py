"""CIFAR-style ResNet-N (He et al. 2016, section 4.2), as in open_lth's ``cifar_resnet``.

A ResNet-N has N = 6n + 2 weighted layers: a 3x3 conv stem, three stages of n basic
blocks (two 3x3 convs each) with ``width``, ``2 * width`` and ``4 * width`` channels
(stride 2 at the start of stages 2 and 3), global average pooling and a linear head
``fc``. Every conv is followed by BatchNorm and has no bias. A shortcut is the identity
unless the block changes the shape, then a 1x1 conv + BatchNorm (He et al.'s option B;
their CIFAR table used option A, zero padding, which has 2,752 fewer parameters at
width 16). Global pooling makes the network work for any image size; an 8x8 input ends
in a 2x2 map.
"""

import re

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BasicBlock", "ResNet", "resnet_depth"]

DEFAULT_WIDTH = 16  # channels of the first stage, as in He et al.'s CIFAR ResNets


def resnet_depth(name: str) -> int | None:
    """The depth N of a ``resnet<N>`` name, or None if ``name`` is not of that form.

    Raises:
        ValueError: for ``resnet<N>`` where N is not 6n + 2 with n >= 1.
    """
    match = re.fullmatch(r"resnet(\d+)", name)
    if match is None:
        return None
    depth = int(match.group(1))
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"{name}: a CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, ...), got {depth}")
    return depth


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a residual connection.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first conv (2 halves the spatial size).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_channels, H, W) to (B, out_channels, H / stride, W / stride)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-N classifier.

    Parameters are PyTorch's default initialisation; ``ckpt_tools.models.build``
    re-initialises conv and linear weights (kaiming normal).

    Args:
        depth: N = 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: outputs of the linear head ``fc``.
        in_channels: image channels.
        image_size: image height = width in pixels (any size >= 1; unused by the layers).
        width: channels of the first stage (default 16).
    """

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: int | None = None,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (8, 14, 20, ...), got {depth}")
        width = DEFAULT_WIDTH if width is None else width
        blocks_per_stage = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, 1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks: list[nn.Module] = []
        channels = width
        for stage in range(3):
            out_channels = width * 2**stage
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, C, H, W) to logits (B, num_classes)."""
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
