from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from poolbench import config, pooling, schema
from poolbench.errors import ConfigError
from poolbench.models import PoolNet, build_model, label

# The architecture that stands for each option that needs `model.arch` (a new library option without
# an entry here fails test_every_option rather than going untested).
EXAMPLE_ARCH = {"torchvision": "resnet18", "timm": "resnet18d"}
# Likewise for the options that need `model._target_` (your own module): the README's example backbone.
EXAMPLE_TARGET = {"custom": "examples.my_backbone.TinyRes"}
OPTIONS = sorted(schema.options("model"))


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
    arch = {"arch": EXAMPLE_ARCH[name]} if name in EXAMPLE_ARCH and "arch" not in model_opts else {}
    arch.update({"_target_": EXAMPLE_TARGET[name]} if name in EXAMPLE_TARGET else {})
    return build_model(
        {"name": name, "pretrained": False, "embedding_dim": 16, **arch, **model_opts},
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


def test_options_include_the_generic_libraries_and_the_01_names() -> None:
    assert {"smallcnn", "torchvision", "timm", "resnet18", "resnet34", "resnet50", "densenet121", "vgg16_bn",
            "mobilenet_v3_large", "efficientnet_b0"} <= set(OPTIONS)  # fmt: skip


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_composes_builds_and_trains(name: str) -> None:
    if name == "timm":
        pytest.importorskip("timm")
    arch = [f"model.arch={EXAMPLE_ARCH[name]}"] if "arch" in schema.options("model")[name].node() else []
    target = [f"model._target_={EXAMPLE_TARGET[name]}"] if name in EXAMPLE_TARGET else []
    cfg = config.compose([f"model={name}", *arch, *target, "model.cifar_stem=true", "pooling=catavgmax"])
    named = EXAMPLE_TARGET[name].rsplit(".", 1)[-1] if target else name
    assert label(cfg.model) == (EXAMPLE_ARCH[name] if arch else named)
    torch.manual_seed(0)
    model = build_model(
        cfg.model, cfg.pooling, cfg.local_pooling, in_channels=3, input_size=32, num_classes=5, task="classification"
    )
    h, w = model.feature_map_size  # a stride-1 stem keeps the final map above 1x1 at 32² input
    assert h > 1 and w > 1
    assert model.pool_out_features == 2 * model.feature_channels  # catavgmax concatenates avg and max
    assert forward_backward(model, 3, 32).shape == (2, 5)
    assert model.features(torch.randn(1, 3, 32, 32)).shape[2:] == (h, w)

    # local pooling replaces every max-pool of the trunk, or says there is none
    plain = build(name, in_channels=3, **({"arch": EXAMPLE_ARCH[name]} if arch else {}))
    max_pools = sum(isinstance(m, nn.MaxPool2d) for m in plain.features.modules())
    local = {"name": "avg", "kernel_size": None, "stride": None, "lr_mult": 1.0}
    if not max_pools:
        with pytest.raises(ConfigError, match="no max-pool layer to replace"):
            build(name, local=local, in_channels=3)
        return
    replaced = build(name, local=local, in_channels=3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in replaced.features.modules())
    assert sum(isinstance(m, pooling.LocalPool) for m in replaced.features.modules()) == max_pools
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
        ("resnet18", {"last_stride": 2}, (2, 2)),
        ("resnet18", {"cifar_stem": True, "last_stride": 1}, (16, 16)),
        ("mobilenet_v3_large", {"last_stride": 1}, (4, 4)),
        ("densenet121", {"last_stride": 1}, (4, 4)),
        ("vgg16_bn", {"cifar_stem": True, "last_stride": 1}, (8, 8)),
    ],
)
def test_feature_map_size_options(name: str, options: dict, size: tuple[int, int]) -> None:
    model = build(name, size=64, **options)
    assert model.feature_map_size == size
    assert model.features(torch.randn(1, 1, 64, 64)).shape[2:] == size


def test_01_names_keep_their_trunks() -> None:
    """The aliases cut the same trunk modules as poolbench 0.1 built by hand (same state-dict keys)."""
    reference = torchvision.models.resnet18().state_dict()
    keys = {
        k.removeprefix("features.") for k in build("resnet18", in_channels=3).state_dict() if k.startswith("features.")
    }
    assert keys == {k for k in reference if not k.startswith("fc.")}
    densenet = build("densenet121", in_channels=3, size=32)
    assert "features.features.conv0.weight" in densenet.state_dict()
    mobilenet = build("mobilenet_v3_large", in_channels=3, size=32)
    assert "features.0.0.weight" in mobilenet.state_dict()


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
        ({"name": "smallcnn", "widht": 3}, {"name": "avg"}, "unknown config key 'model.widht' for model=smallcnn"),
        ({"name": "smallcnn", "last_stride": 3}, {"name": "avg"}, "model.last_stride '3'.*1, 2"),
        ({"name": "smallcnn", "depth": 0}, {"name": "avg"}, "model.depth must be an integer >= 1"),
        ({"name": "resnet18", "arch": "resnet34"}, {"name": "avg"}, "unknown config key 'model.arch' for model=resn"),
        ({"name": "torchvision", "arch": None}, {"name": "avg"}, "model.arch is required: a torchvision"),
        ({"name": "torchvision", "arch": "resnt18"}, {"name": "avg"}, "unknown torchvision model 'resnt18'.*resnet18"),
        ({"name": "smallcnn", "cifar_stem": True, "depth": 1, "last_stride": 1}, {"name": "avg"},
         "model.last_stride=1: smallcnn has no strided layer"),
        ({"name": "smallcnn"}, {"name": "gem", "p": -1.0}, "pooling=gem"),
        ({"name": "smallcnn"}, {"name": "avgg"}, "Did you mean 'avg'"),
        ({"name": "smallcnn", "pretrained": True}, {"name": "avg"}, "no pretrained weights"),
    ],
)  # fmt: skip
def test_config_errors(model_opts: dict, pool: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_model(model_opts, pool, {"name": "none"}, in_channels=1, input_size=32, num_classes=3, task="retrieval")
    assert "\n" not in str(info.value)


def test_check_refuses_unknown_architectures_without_building() -> None:
    from poolbench.models import check

    check({"name": "torchvision", "arch": "regnet_y_400mf"})
    with pytest.raises(ConfigError, match="unknown torchvision model 'regnet_y_400'.*regnet_y_400mf"):
        check({"name": "torchvision", "arch": "regnet_y_400"})


def test_label_names_the_backbone() -> None:
    assert label({"name": "resnet18", "pretrained": False}) == "resnet18"
    assert label({"name": "torchvision", "arch": "convnext_tiny"}) == "convnext_tiny"
    assert label({"name": "timm", "arch": "hf-hub:timm/resnet18.a1_in1k"}) == "hf-hub:timm/resnet18.a1_in1k"


def test_pretrained_needs_cached_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ConfigError, match=f"expected {expected}"):
        build("resnet18", pretrained=True, in_channels=3)
    # With the file in the cache it is loaded (here: a random state dict standing in for the weights).
    expected.parent.mkdir()
    reference = torchvision.models.resnet18().state_dict()
    torch.save(reference, expected)
    model = build("torchvision", arch="resnet18", pretrained=True, in_channels=1)
    assert torch.equal(model.features.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    # One input channel: the RGB stem filters are summed.
    assert torch.allclose(model.features.conv1.weight, reference["conv1.weight"].sum(dim=1, keepdim=True))


def test_timm_pretrained_only_from_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    arch, repo = "mobilenetv3_small_050.lamb_in1k", "timm/mobilenetv3_small_050.lamb_in1k"
    with pytest.raises(ConfigError, match=f"expected repo {repo} .* under {tmp_path}"):
        build("timm", arch=arch, pretrained=True, in_channels=3)
    # A cache in the Hugging Face layout, holding a random state dict standing in for the weights.
    folder, commit = tmp_path / f"models--{repo.replace('/', '--')}", "0" * 40
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    torch.manual_seed(1)
    reference = timm.create_model("mobilenetv3_small_050").state_dict()
    torch.save(reference, folder / "snapshots" / commit / "pytorch_model.bin")
    model = build("timm", arch=arch, pretrained=True, in_channels=3)
    assert torch.equal(model.features.model.conv_stem.weight, reference["conv_stem.weight"])


def test_timm_stays_offline_when_the_program_imported_huggingface_hub_first() -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, when first imported: a program (or test module) that
    imported timm before poolbench must still get the one-line cache error, never the network's retries."""
    import subprocess
    import sys

    code = (
        "import os; os.environ.pop('HF_HUB_OFFLINE', None); import timm, huggingface_hub.constants as c\n"
        "assert not c.is_offline_mode()\n"
        "from poolbench.errors import ConfigError\n"
        "from poolbench.models import timm as backbones\n"
        "try:\n"
        "    backbones.build('hf-hub:nobody/not-cached', False, 3)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
        "print('offline', c.is_offline_mode())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "Hugging Face repo nobody/not-cached is not in the local cache" in out.stdout
    assert "offline True" in out.stdout
