from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from poolbench import pooling
from poolbench.errors import ConfigError
from poolbench.models import PoolNet, build_model, model_names


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def build(
    name: str = "smallcnn",
    pool: dict | None = None,
    local: dict | None = None,
    *,
    task: str = "retrieval",
    size: int = 64,
    in_channels: int = 1,
    **model_opts: object,
) -> PoolNet:
    torch.manual_seed(0)
    return build_model(
        {"name": name, "pretrained": False, "embedding_dim": 16, **model_opts},
        pool or {"name": "avg", "lr_mult": 1.0},
        local or {"name": "none"},
        in_channels=in_channels,
        input_size=size,
        num_classes=5,
        task=task,
    )


def forward_backward(model: PoolNet, in_channels: int, size: int) -> torch.Tensor:
    out = model(torch.randn(2, in_channels, size, size))
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    return out


def test_model_names() -> None:
    assert model_names() == [
        "smallcnn", "resnet18", "resnet34", "resnet50", "densenet121", "vgg16_bn", "mobilenet_v3_large",
        "efficientnet_b0",
    ]  # fmt: skip


@pytest.mark.parametrize("name", model_names())
def test_every_backbone_with_global_and_local_pooling(name: str) -> None:
    # A stride-1 stem keeps the final map above 1×1 at 32² input.
    model = build(name, {"name": "catavgmax"}, size=32, in_channels=3, cifar_stem=True, task="classification")
    h, w = model.feature_map_size
    assert h > 1 and w > 1
    assert model.pool_out_features == 2 * model.feature_channels  # catavgmax concatenates avg and max
    assert forward_backward(model, 3, 32).shape == (2, 5)
    assert model.features(torch.randn(1, 3, 32, 32)).shape[2:] == (h, w)

    local = {"name": "avg", "kernel_size": None, "stride": None, "lr_mult": 1.0}
    if name in ("mobilenet_v3_large", "efficientnet_b0"):  # strided convs only: nothing to replace
        with pytest.raises(ConfigError, match="no max-pool layer to replace"):
            build(name, local=local, in_channels=3)
        return
    plain = build(name, in_channels=3)
    replaced = build(name, local=local, in_channels=3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in replaced.features.modules())
    assert any(isinstance(m, pooling.LocalPool) for m in replaced.features.modules())
    assert replaced.feature_map_size == plain.feature_map_size  # inherited geometry keeps the map size
    out = forward_backward(replaced, 3, 64)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)  # retrieval embedding is L2-normalised


@pytest.mark.parametrize(
    ("pool", "width"),
    [({"name": "avg"}, 1), ({"name": "catavgmax"}, 2), ({"name": "dgmp", "lr_mult": 1000.0}, 1),
     ({"name": "spp", "levels": [1, 2]}, 5), ({"name": "netvlad", "clusters": 4}, 4)],
)  # fmt: skip
@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_pool_width_sizes_the_head(name: str, pool: dict, width: int) -> None:
    model = build(name, pool, size=32, cifar_stem=True)
    assert model.pool_out_features == width * model.feature_channels
    assert model.head[0].in_features == model.pool_out_features
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
    forward_backward(model, 1, 32)


@pytest.mark.parametrize(
    ("name", "options", "size"),
    [
        ("smallcnn", {}, (8, 8)),
        ("smallcnn", {"cifar_stem": True}, (16, 16)),
        ("smallcnn", {"last_stride": 1}, (16, 16)),
        ("smallcnn", {"depth": 2, "width": 8}, (16, 16)),
        ("resnet18", {}, (2, 2)),
        ("resnet18", {"cifar_stem": True}, (8, 8)),
        ("resnet18", {"last_stride": 1}, (4, 4)),
        ("resnet18", {"cifar_stem": True, "last_stride": 1}, (16, 16)),
        ("mobilenet_v3_large", {"last_stride": 1}, (4, 4)),
    ],
)
def test_feature_map_size_options(name: str, options: dict, size: tuple[int, int]) -> None:
    model = build(name, size=64, **options)
    assert model.feature_map_size == size
    assert model.features(torch.randn(1, 1, 64, 64)).shape[2:] == size


def test_pool_parameters_are_separated() -> None:
    model = build(pool={"name": "gem", "p": 3.0}, local={"name": "mixed", "kernel_size": None, "stride": None})
    assert [p.numel() for p in model.global_pool_parameters()] == [1]
    assert len(model.local_pool_parameters()) == 3  # one learnable mix per replaced max-pool
    pool_ids = {id(p) for p in model.pool_parameters()}
    assert not pool_ids & {id(p) for p in model.backbone_parameters()}
    assert len(pool_ids) + len(model.backbone_parameters()) == len(list(model.parameters()))


def test_local_pooling_explicit_geometry() -> None:
    model = build(local={"name": "avg", "kernel_size": 4, "stride": 4})
    assert model.feature_map_size == (1, 1)  # 64 / 4³


def test_classification_head_and_in_channels() -> None:
    model = build("resnet18", task="classification", in_channels=2, size=32)
    assert model.features.conv1.in_channels == 2
    assert model(torch.randn(3, 2, 32, 32)).shape == (3, 5)


@pytest.mark.parametrize(
    ("model_opts", "pool", "message"),
    [
        ({"name": "resnet51"}, {"name": "avg"}, "unknown model 'resnet51'. Did you mean"),
        ({"name": "smallcnn", "widht": 3}, {"name": "avg"}, "unknown key 'model.widht'"),
        ({"name": "smallcnn", "last_stride": 3}, {"name": "avg"}, "last_stride must be"),
        ({"name": "smallcnn"}, {"name": "gem", "p": -1.0}, "pooling=gem"),
        ({"name": "smallcnn"}, {"name": "avgg"}, "Did you mean 'avg'"),
        ({"name": "smallcnn", "pretrained": True}, {"name": "avg"}, "no pretrained weights"),
    ],
)
def test_config_errors(model_opts: dict, pool: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(model_opts, pool, {"name": "none"}, in_channels=1, input_size=32, num_classes=3, task="retrieval")


def test_pretrained_needs_cached_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ConfigError, match=f"expected {expected}"):
        build("resnet18", pretrained=True, in_channels=3)
    # With the file in the cache it is loaded (here: a random state dict standing in for the weights).
    expected.parent.mkdir()
    reference = torchvision.models.resnet18().state_dict()
    torch.save(reference, expected)
    model = build("resnet18", pretrained=True, in_channels=1)
    assert torch.equal(model.features.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    # One input channel: the RGB stem filters are summed.
    assert torch.allclose(model.features.conv1.weight, reference["conv1.weight"].sum(dim=1, keepdim=True))
