"""Generic backbones: torchvision and timm architectures through the same trunk surgery.

Each architecture is built plain, with ``cifar_stem`` and with ``last_stride=1`` (both must enlarge the
final map or stop with a one-line error naming the architecture), its max-pools are replaced by a local
pool, and it runs forward and backward at 32x32.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poolbench import pooling
from poolbench.errors import ConfigError
from poolbench.models import PoolNet, build_model

timm = pytest.importorskip("timm")

# (library, arch, whether it has max-pools to replace)
ARCHITECTURES = [
    ("torchvision", "resnet18", True),
    pytest.param("torchvision", "resnext50_32x4d", True, marks=pytest.mark.slow),
    pytest.param("torchvision", "wide_resnet50_2", True, marks=pytest.mark.slow),
    ("torchvision", "regnet_x_400mf", False),
    pytest.param("torchvision", "convnext_tiny", False, marks=pytest.mark.slow),
    ("torchvision", "efficientnet_b0", False),
    ("torchvision", "mobilenet_v3_small", False),
    pytest.param("torchvision", "densenet121", True, marks=pytest.mark.slow),
    # VGG-bn in the fast tier: the vgg16_bn option of tests/test_models.py (plain, cifar_stem, last_stride=1, local).
    pytest.param("torchvision", "vgg11_bn", True, marks=pytest.mark.slow),
    ("timm", "resnet18d", True),
    ("timm", "convnext_atto", False),
    # timm's EfficientNet family in the fast tier: mobilenetv3_small_050 (the same stem and block surgery).
    pytest.param("timm", "efficientnet_b0", False, marks=pytest.mark.slow),
    ("timm", "mobilenetv3_small_050", False),
    ("timm", "regnetx_002", False),
]
LOCAL = {"name": "avg", "kernel_size": None, "stride": None, "lr_mult": 1.0}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def build(library: str, arch: str, size: int, local: dict | None = None, **options: object) -> PoolNet:
    torch.manual_seed(0)
    return build_model(
        {"name": library, "arch": arch, "embedding_dim": 8, **options},
        {"name": "gem"},
        local or {"name": "none"},
        in_channels=1,
        input_size=size,
        num_classes=3,
        task="retrieval",
    )


def area(model: PoolNet) -> int:
    h, w = model.feature_map_size
    return h * w


@pytest.mark.parametrize(("library", "arch", "has_max_pools"), ARCHITECTURES)
def test_architecture(library: str, arch: str, has_max_pools: bool) -> None:
    plain = build(library, arch, 64)
    assert not isinstance(plain.features, nn.AdaptiveAvgPool2d)
    assert not any(
        isinstance(m, nn.Linear) and m.out_features == 1000 for m in plain.features.modules()
    )  # no classifier
    for option in ({"cifar_stem": True}, {"last_stride": 1}):
        assert area(build(library, arch, 64, **option)) > area(plain), option  # never silently ignored

    small = build(library, arch, 32, cifar_stem=True)
    assert small.feature_map_size[0] > 1
    out = small(torch.randn(2, 1, 32, 32))
    out.square().sum().backward()
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)

    if not has_max_pools:
        with pytest.raises(ConfigError, match="no max-pool layer to replace"):
            build(library, arch, 64, local=LOCAL)
        return
    replaced = build(library, arch, 64, local=LOCAL)
    assert not any(isinstance(m, nn.MaxPool2d) for m in replaced.features.modules())
    assert any(isinstance(m, pooling.LocalPool) for m in replaced.features.modules())
    assert replaced.feature_map_size == plain.feature_map_size  # inherited geometry keeps the map size


@pytest.mark.parametrize(
    ("library", "arch", "message"),
    [
        ("torchvision", "vit_b_16", "torchvision vit_b_16 has no global pool"),
        ("torchvision", "resnet19", "unknown torchvision model 'resnet19'.*Close: resnet18"),
        ("timm", "vit_tiny_patch16_224", "timm vit_tiny_patch16_224 .*not a \\(B, C, H, W\\) map"),
        ("timm", "swin_tiny_patch4_window7_224", "timm swin_tiny_patch4_window7_224 yields NHWC features"),
        ("timm", "resnet18e", "unknown timm model 'resnet18e'.*Close: .*resnet18d"),
        ("timm", "org/repo", "model.arch=org/repo: .*hf-hub:org/repo"),
        ("timm", "hf-hub:nobody/not-cached", "Hugging Face repo nobody/not-cached is not in the local cache"),
    ],
)
def test_unusable_architectures_are_one_line_errors(library: str, arch: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build(library, arch, 64)
    assert "\n" not in str(info.value)


def test_last_stride_refuses_downsampling_it_cannot_see() -> None:
    with pytest.raises(ConfigError, match="torchvision swin_t downsamples after its last strided layer"):
        build("torchvision", "swin_t", 64, last_stride=1)


def test_torchvision_convnext_keeps_its_head_norm() -> None:
    from poolbench.models.torchvision import build as trunk

    features = trunk("convnext_tiny", pretrained=False)
    assert isinstance(features[-1], nn.LayerNorm)  # the classifier's LayerNorm2d, now before the pool


def test_timm_convnext_keeps_its_head_norm() -> None:
    model = build("timm", "convnext_atto", 64)
    assert model.features.with_head  # ConvNeXt's head LayerNorm2d normalises the map before the pool
