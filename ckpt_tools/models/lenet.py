"""LeNet-300-100 (LeCun et al. 1998), the fully connected net of the lottery ticket papers.

Flatten, 300 ReLU units, 100 ReLU units, a linear head ``fc``.
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LeNet300"]

DEFAULT_WIDTH = 300  # first hidden layer; the second has width // 3


class LeNet300(nn.Module):
    """Fully connected LeNet-300-100.

    Parameters are PyTorch's default initialisation; ``ckpt_tools.models.build``
    re-initialises the linear weights (kaiming normal).

    Args:
        num_classes: outputs of the linear head ``fc``.
        in_channels: image channels.
        image_size: image height = width in pixels.
        width: first hidden size (default 300); the second is ``width // 3``.
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
        if width < 3:
            raise ValueError(f"lenet300 width must be >= 3 (second layer: width // 3), got {width}")
        self.fc1 = nn.Linear(in_channels * image_size * image_size, width)
        self.fc2 = nn.Linear(width, width // 3)
        self.fc = nn.Linear(width // 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, C, H, W) to logits (B, num_classes)."""
        out = F.relu(self.fc1(x.flatten(1)))
        out = F.relu(self.fc2(out))
        return self.fc(out)
