"""CIFAR-style VGG-11/13/16 with BatchNorm (Simonyan & Zisserman 2015).

After open_lth's ``cifar_vgg``: stacks of 3x3 conv + BatchNorm + ReLU separated by 2x2
max pools, then global average pooling and one linear layer ``fc`` (no 4096-wide
classifier, as in the CIFAR variants).
Convs have no bias (BatchNorm follows). A max pool that would shrink the feature map
below 1x1 is left out, so 8x8 (digits) and 28x28 (MNIST) inputs work: at 32x32 all four
pools are kept and the last map is 2x2, as in open_lth.
"""

import torch
from torch import nn

__all__ = ["PLANS", "VGG"]

DEFAULT_WIDTH = 64  # channels of the first block, as in the original VGG

# Channels of each conv relative to the first block's 64; "M" is a 2x2 max pool.
PLANS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
}


class VGG(nn.Module):
    """VGG classifier with BatchNorm.

    Parameters are PyTorch's default initialisation; ``ckpt_tools.models.build``
    re-initialises conv and linear weights (kaiming normal).

    Args:
        depth: 11, 13 or 16.
        num_classes: outputs of the linear head ``fc``.
        in_channels: image channels.
        image_size: image height = width in pixels; decides which pools are kept.
        width: channels of the first block (default 64); every block scales with it.
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
        if depth not in PLANS:
            raise ValueError(f"VGG depth must be one of {sorted(PLANS)}, got {depth}")
        width = DEFAULT_WIDTH if width is None else width
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for entry in PLANS[depth]:
            if entry == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out_channels = int(entry) * width // DEFAULT_WIDTH
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, C, H, W) to logits (B, num_classes)."""
        return self.fc(self.pool(self.features(x)).flatten(1))
