import pytest
import torch
from torch import nn

from ckpt_tools.models import MODEL_NAMES, build, output_layer_name, prunable_parameter_names

# (in_channels, image_size): digits, MNIST-like, CIFAR-like
SHAPES = [(1, 8), (1, 28), (3, 32)]


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resnet_reference_count(depth: int, in_channels: int, num_classes: int, w: int = 16) -> int:
    """Parameters of a CIFAR ResNet with 1x1 conv + BN shortcuts, counted by hand.

    A 3x3 conv c_in -> c_out has 9 c_in c_out weights (no bias), a BatchNorm 2 c params.
    """
    n = (depth - 2) // 6
    total = 9 * in_channels * w + 2 * w  # stem conv + BN
    c_in = w
    for stage in range(3):
        c = w * 2**stage
        for block in range(n):
            total += 9 * c_in * c + 9 * c * c + 4 * c  # conv1, conv2, bn1, bn2
            if block == 0 and c_in != c:
                total += c_in * c + 2 * c  # 1x1 conv + BN shortcut
            c_in = c
    return total + c_in * num_classes + num_classes  # fc


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("in_channels", "image_size"), SHAPES)
def test_builds_and_forwards(name, in_channels, image_size):
    torch.manual_seed(0)
    model = build(name, num_classes=10, in_channels=in_channels, image_size=image_size)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert output_layer_name(model) == "fc"
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 10


def test_resnet20_parameter_count():
    # 272,474 = stem 3*16*9 + 32 (BN) = 464
    #   + stage 1: 3 blocks * (2 * 16*16*9 + 4*16) = 14,016
    #   + stage 2: (16*32*9 + 32*32*9 + 4*32) + shortcut (16*32 + 2*32) + 2 * (2*32*32*9 + 4*32)
    #              = 13,952 + 576 + 37,120 = 51,648
    #   + stage 3: (32*64*9 + 64*64*9 + 4*64) + shortcut (32*64 + 2*64) + 2 * (2*64*64*9 + 4*64)
    #              = 55,552 + 2,176 + 147,968 = 205,696
    #   + fc 64*10 + 10 = 650.
    # With zero-padding (option A) shortcuts it would be 272,474 - 576 - 2,176 = 269,722.
    model = build("resnet20", num_classes=10, in_channels=3, image_size=32, width=16)
    assert n_params(model) == 272_474


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56, 110])
def test_resnet_counts_match_hand_count(depth):
    for in_channels, num_classes in [(1, 10), (3, 100)]:
        model = build(
            f"resnet{depth}", num_classes=num_classes, in_channels=in_channels, image_size=8
        )
        assert n_params(model) == resnet_reference_count(depth, in_channels, num_classes)


def test_known_counts():
    # LeNet-300-100 on MNIST: 784*300+300 + 300*100+100 + 100*10+10.
    assert n_params(build("lenet300", num_classes=10, in_channels=1, image_size=28)) == 266_610
    lenet = build("lenet300", num_classes=10, in_channels=1, image_size=8, width=30)
    assert (lenet.fc1.out_features, lenet.fc2.out_features) == (30, 10)
    # Parameter counts of the conv nets do not depend on the image size (global pooling).
    for name in ["convnet", "resnet20", "vgg11"]:
        counts = {
            n_params(build(name, num_classes=10, in_channels=1, image_size=s, width=8))
            for s in (8, 28, 32)
        }
        assert len(counts) == 1
    convnet = build("convnet", num_classes=10, in_channels=1, image_size=8)
    assert 3_000 <= n_params(convnet) <= 30_000


def test_width_scales_channels():
    narrow = build("resnet20", num_classes=10, in_channels=3, image_size=32, width=8)
    assert narrow.conv.out_channels == 8 and narrow.fc.in_features == 32
    vgg = build("vgg11", num_classes=10, in_channels=3, image_size=32, width=16)
    assert vgg.fc.in_features == 128
    convnet = build("convnet", num_classes=10, in_channels=1, image_size=8, width=4)
    assert convnet.fc.in_features == 16


def test_vgg_skips_pools_that_would_empty_the_map():
    pools = {
        s: sum(
            isinstance(m, nn.MaxPool2d)
            for m in build("vgg16", num_classes=10, in_channels=1, image_size=s, width=8).modules()
        )
        for s in (8, 28, 32)
    }
    assert pools == {8: 3, 28: 4, 32: 4}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_deterministic_under_seed(name):
    def state(seed):
        torch.manual_seed(seed)
        return build(name, num_classes=10, in_channels=1, image_size=8, width=8).state_dict()

    a, b, c = state(0), state(0), state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_kaiming_normal_init():
    torch.manual_seed(0)
    model = build("resnet20", num_classes=10, in_channels=3, image_size=32)
    weight = model.blocks[-1].conv2.weight  # 64 x 64 x 3 x 3, fan in 576
    assert weight.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.03)
    assert weight.mean().abs().item() < 0.002
    assert torch.equal(model.bn.weight, torch.ones(16))


def test_prunable_parameter_names():
    model = build("resnet20", num_classes=10, in_channels=3, image_size=32)
    names = prunable_parameter_names(model)
    # stem + 18 block convs + 2 shortcut convs + fc
    assert len(names) == 22
    assert names[0] == "conv.weight" and names[-1] == "fc.weight"
    assert "blocks.3.shortcut.0.weight" in names
    order = [n for n, _ in model.named_parameters()]
    assert names == [n for n in order if n in set(names)]
    assert not any("bn" in n or n.endswith("bias") for n in names)
    lenet = build("lenet300", num_classes=10, in_channels=1, image_size=8)
    assert prunable_parameter_names(lenet) == ["fc1.weight", "fc2.weight", "fc.weight"]
    for name in MODEL_NAMES:
        model = build(name, num_classes=10, in_channels=1, image_size=8, width=8)
        names = prunable_parameter_names(model)
        assert all(
            isinstance(model.get_submodule(n.removesuffix(".weight")), (nn.Conv2d, nn.Linear))
            for n in names
        )
        assert f"{output_layer_name(model)}.weight" == names[-1]


def test_helpers_on_other_models():
    seq = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)
    )
    assert output_layer_name(seq) == "4"
    assert prunable_parameter_names(seq) == ["0.weight", "2.weight", "4.weight"]
    assert prunable_parameter_names(nn.Linear(3, 2)) == ["weight"]
    with pytest.raises(ValueError, match="no nn.Linear"):
        output_layer_name(nn.Conv2d(1, 1, 1))


def test_unknown_and_invalid_names():
    with pytest.raises(ValueError, match="known models: .*resnet20"):
        build("resnet", num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="6n\\+2"):
        build("resnet21", num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="num_classes"):
        build("convnet", num_classes=0, in_channels=1, image_size=8)
    assert sorted(MODEL_NAMES) == MODEL_NAMES
    assert {"resnet20", "resnet110", "vgg11", "lenet300", "convnet"} <= set(MODEL_NAMES)
