"""Model zoo: parameter counts (pinned), module names, forward shapes, meta-device construction."""

import pytest
import torch
from torch import nn

from kfac_dist.app.models import MODEL_NAMES, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        # torchvision's published counts (1000 classes).
        ("resnet18", {}, 11_689_512),
        ("resnet34", {}, 21_797_672),
        ("resnet50", {}, 25_557_032),
        ("resnet101", {}, 44_549_160),
        ("resnet152", {}, 60_192_808),
        # 1/8 width: stem 8 channels, stages 8/16/32/64 (x4 expansion).
        ("resnet50", {"width_multiplier": 0.125}, 631_152),
        # He et al. 2016 option A (parameter-free shortcuts), 10 classes. ResNet-20: stem conv 3*16*9 = 432
        # + BN 32; stage 1: 3 blocks x 2 x (16*16*9 + 32) = 14,016; stage 2: (16*32*9 + 64) + (32*32*9 + 64)
        # + 2 x 2 x (32*32*9 + 64) = 51,072; stage 3 likewise with 32->64: 203,520; fc 64*10 + 10 = 650.
        # (The derivation is also checked term by term in test_cifar_resnet20_count_derivation.)
        ("cifar_resnet20", {}, 269_722),
        ("cifar_resnet32", {}, 464_154),
        ("cifar_resnet56", {}, 853_018),
        # conv 1*16*25 + 16 = 416; conv 16*32*25 + 32 = 12,832; fc 512*10 + 10 = 5,130.
        ("small_cnn", {}, 18_378),
        # 784*128 + 128 + 128*64 + 64 + 64*10 + 10.
        ("mlp", {}, 109_386),
        # 784-256-128-32-128-256-784: 200,960 + 32,896 + 4,128 + 4,224 + 33,024 + 201,488.
        ("autoencoder", {}, 476_720),
    ],
)
def test_parameter_counts(name, kwargs, expected):
    with torch.device("meta"):
        model = build_model(name, **kwargs)
    assert n_params(model) == expected


def test_cifar_resnet20_count_derivation():
    def conv_bn(c_in, c_out):
        return c_in * c_out * 9 + 2 * c_out

    stem = conv_bn(3, 16)
    stage1 = 3 * 2 * conv_bn(16, 16)
    stage2 = conv_bn(16, 32) + conv_bn(32, 32) + 2 * 2 * conv_bn(32, 32)
    stage3 = conv_bn(32, 64) + conv_bn(64, 64) + 2 * 2 * conv_bn(64, 64)
    fc = 64 * 10 + 10
    assert (stem, stage1, stage2, stage3, fc) == (464, 14_016, 51_072, 203_520, 650)
    assert n_params(build_model("cifar_resnet20")) == stem + stage1 + stage2 + stage3 + fc


def test_resnet50_has_torchvision_module_names_and_v15_stride():
    with torch.device("meta"):
        model = build_model("resnet50")
    names = dict(model.named_modules())
    for key in [
        "conv1",
        "bn1",
        "layer1.0.conv1",
        "layer1.0.downsample.0",
        "layer4.2.conv3",
        "layer4.2.bn3",
        "fc",
    ]:
        assert key in names, key
    # v1.5: the stride of a downsampling bottleneck sits on the 3x3 conv.
    assert names["layer2.0.conv1"].stride == (1, 1)
    assert names["layer2.0.conv2"].stride == (2, 2)
    assert names["layer2.0.downsample.0"].stride == (2, 2)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 53
    state_keys = set(model.state_dict())
    assert {"layer3.5.bn2.running_mean", "layer1.0.downsample.1.num_batches_tracked", "fc.bias"} <= state_keys


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_meta_device_build(name):
    with torch.device("meta"):
        model = build_model(name)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)


@pytest.mark.parametrize(
    ("name", "kwargs", "input_shape", "classes"),
    [
        ("small_cnn", {}, (2, 1, 28, 28), 10),
        ("mlp", {}, (3, 1, 28, 28), 10),
        ("mlp", {"in_features": 12, "hidden": (5,), "num_classes": 4}, (3, 12), 4),
        ("autoencoder", {}, (3, 1, 28, 28), 784),
        ("autoencoder", {"in_features": 12, "hidden": (6, 2)}, (2, 3, 4), 12),
        ("resnet18", {"width_multiplier": 0.125, "num_classes": 7}, (2, 3, 32, 32), 7),
        ("resnet50", {"width_multiplier": 0.125, "num_classes": 5}, (2, 3, 64, 64), 5),
        ("cifar_resnet20", {}, (2, 3, 32, 32), 10),
        ("cifar_resnet32", {"num_classes": 100}, (1, 3, 32, 32), 100),
    ],
)
def test_forward_shapes(name, kwargs, input_shape, classes):
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(input_shape))
    assert out.shape == (input_shape[0], classes)
    assert torch.isfinite(out).all()


def test_resnet50_forward_on_meta_device_has_imagenet_shapes():
    with torch.device("meta"):
        model = build_model("resnet50")
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 1000)


def test_width_multiplier_scales_every_stage():
    model = build_model("resnet18", width_multiplier=0.125)
    assert model.conv1.out_channels == 8
    assert [getattr(model, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [8, 16, 32, 64]
    assert model.fc.in_features == 64


@pytest.mark.parametrize("hidden", [(256, 128, 32), (7, 3), (5,)])
def test_autoencoder_layout_is_mirrored_with_a_linear_code(hidden):
    model = build_model("autoencoder", in_features=20, hidden=hidden)
    modules = list(model.children())
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    widths = [20, *hidden, *reversed(hidden[:-1]), 20]
    assert isinstance(modules[0], nn.Flatten)
    assert [(m.in_features, m.out_features) for m in linears] == list(zip(widths[:-1], widths[1:], strict=True))
    assert sum(isinstance(m, nn.Tanh) for m in modules) == len(linears) - 2
    code = model.get_submodule(f"fc{len(hidden)}")
    assert code.out_features == hidden[-1]
    after_code = modules[modules.index(code) + 1]
    assert isinstance(after_code, nn.Linear)  # the code is linear: the decoder's first layer follows directly
    assert isinstance(modules[-1], nn.Linear)  # logits
    assert n_params(model) == sum((d_in + 1) * d_out for d_in, d_out in zip(widths[:-1], widths[1:], strict=True))


def test_cifar_option_a_shortcut_is_parameter_free_and_downsamples():
    model = build_model("cifar_resnet20")
    assert not any("downsample" in name or "shortcut" in name for name, _ in model.named_parameters())
    block = model.layer2[0]
    x = torch.randn(1, 16, 32, 32)
    assert block._shortcut(x).shape == (1, 32, 16, 16)
    assert torch.equal(block._shortcut(x)[:, 8:24], x[:, :, ::2, ::2])


def test_backward_through_inplace_relu_models():
    torch.manual_seed(0)
    model = build_model("small_cnn")
    loss = model(torch.randn(4, 1, 28, 28)).logsumexp(dim=1).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("resnet9000", {}, "unknown model 'resnet9000'"),
        ("resnet50", {"width_multiplier": 0.0}, "width_multiplier"),
        ("cifar_resnet20", {"depth": 21}, "depth"),
        ("mlp", {"hidden": (0,)}, "positive"),
        ("autoencoder", {"hidden": (256, -3, 32)}, r"positive.*\[784, 256, -3, 32\]"),
        ("autoencoder", {"in_features": 0}, r"\[0, 256, 128, 32\]"),
        ("autoencoder", {"hidden": ()}, "non-empty"),
    ],
)
def test_bad_arguments_are_rejected_with_a_named_message(name, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_model(name, **kwargs)
