"""Built-in models, built by name: ``build("resnet20", num_classes=10, in_channels=3, ...)``.

Every model ends in a linear layer named ``fc`` (its parameters are ``fc.weight`` and
``fc.bias``), takes images (B, C, H, W) and returns logits (B, num_classes).

Initialisation, as open_lth's ``kaiming_normal`` initializer: the weights of every conv
and linear layer are drawn by ``torch.nn.init.kaiming_normal_`` (fan in, ReLU gain,
std = sqrt(2 / fan_in)); biases and BatchNorm keep PyTorch's defaults (BatchNorm weight
1, bias 0). All of it is drawn from torch's global generator, so the same
``torch.manual_seed`` gives the same model. Models are built on the CPU in the default
dtype; move them with ``.to(...)``.

A new family is one module plus one line in ``_FAMILIES``.
"""

from collections.abc import Callable
from functools import partial

from torch import nn

from ckpt_tools.models import convnet, lenet, resnet, vgg

__all__ = ["MODEL_NAMES", "build", "output_layer_name", "prunable_parameter_names"]

_FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "convnet": convnet.ConvNet,
    "lenet300": lenet.LeNet300,
    "vgg11": partial(vgg.VGG, 11),
    "vgg13": partial(vgg.VGG, 13),
    "vgg16": partial(vgg.VGG, 16),
}
_RESNET_DEPTHS = (20, 32, 44, 56, 110)  # listed; any resnet<6n+2> is accepted

MODEL_NAMES: list[str] = sorted([*_FAMILIES, *(f"resnet{d}" for d in _RESNET_DEPTHS)])

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def build(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: int | None = None,
) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: one of ``MODEL_NAMES``, or ``resnet<N>`` for any N = 6n + 2.
        num_classes: outputs of the final linear layer ``fc``.
        in_channels: image channels (1 for digits/MNIST, 3 for CIFAR/SVHN).
        image_size: image height = width in pixels (8 for digits, 28, 32, ...).
        width: the family's width knob, None for its default: channels of the first
            stage/block (resnet 16, vgg 64, convnet 16) or first hidden size (lenet300 300).

    Returns:
        The model on the CPU, in training mode, weights drawn from torch's global RNG.

    Raises:
        ValueError: unknown name (the message lists the known ones) or a non-positive size.
    """
    for label, value in [
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
        ("width", 1 if width is None else width),
    ]:
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    depth = resnet.resnet_depth(name)
    if depth is not None:
        factory: Callable[..., nn.Module] = partial(resnet.ResNet, depth)
    elif name in _FAMILIES:
        factory = _FAMILIES[name]
    else:
        known = ", ".join(MODEL_NAMES)
        raise ValueError(f"unknown model {name!r}; known models: {known} (or resnet<6n+2>)")
    model = factory(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width
    )
    _init_weights(model)
    return model


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, _PRUNABLE):
            nn.init.kaiming_normal_(module.weight)


def output_layer_name(model: nn.Module) -> str:
    """The parameter-name prefix of the model's final linear layer (``"fc"`` for ours).

    Used to leave the output layer out of pruning. For other models: the module named
    ``fc`` if it is an ``nn.Linear``, else the last ``nn.Linear`` in registration order.

    Raises:
        ValueError: the model has no ``nn.Linear``.
    """
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return "fc"
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer")
    return linears[-1]


def prunable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the prunable parameters, in ``model.named_parameters()`` order.

    Prunable: the weights of ``nn.Conv1d/2d/3d`` and ``nn.Linear`` modules, the output
    layer included (see ``output_layer_name``); biases and BatchNorm are not.
    """
    weights = {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, _PRUNABLE)
    }
    return [name for name, _ in model.named_parameters() if name in weights]
