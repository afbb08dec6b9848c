"""A small conv net for quick runs.

Three 3x3 conv + BatchNorm + ReLU blocks with ``width``, ``2 * width`` and ``4 * width``
channels, a 2x2 max pool after the second and third (left out when the map is already
1x1), global average pooling and a linear head ``fc``. About 24k parameters at the
default width, whatever the image size.
"""

import torch
from torch import nn

__all__ = ["ConvNet"]

DEFAULT_WIDTH = 16  # channels of the first block


class ConvNet(nn.Module):
    """Small convolutional classifier.

    Parameters are PyTorch's default initialisation; ``ckpt_tools.models.build``
    re-initialises conv and linear weights (kaiming normal).

    Args:
        num_classes: outputs of the linear head ``fc``.
        in_channels: image channels.
        image_size: image height = width in pixels; decides which pools are kept.
        width: channels of the first block (default 16).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: int | None = None,
    ) -> None:
        super().__init__()
        width = DEFAULT_WIDTH if width is None else width
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for block in range(3):
            out_channels = width * 2**block
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            if block > 0 and size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, C, H, W) to logits (B, num_classes)."""
        return self.fc(self.pool(self.features(x)).flatten(1))
