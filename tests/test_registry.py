"""The public registration API, config nodes → operators (from_config), labels and learned scalars."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from poolbench import pooling, sweep
from poolbench.config import compose, group_options, run_id
from poolbench.errors import ConfigError
from poolbench.pooling import registry


@pytest.fixture
def scratch_registry() -> Iterator[None]:
    """Operators registered inside a test are gone afterwards (and so are their config options)."""
    saved = {kind: dict(table) for kind, table in registry._REGISTRY.items()}
    yield
    for kind, table in saved.items():
        registry._REGISTRY[kind].clear()
        registry._REGISTRY[kind].update(table)


class Temperature(pooling.GlobalPool):
    """Σ softmax(x/τ)·x, τ learnable (as log τ): a small operator with a float parameter."""

    def __init__(self, tau: float = 1.0, hard: bool = False) -> None:
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        self.hard = hard

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(2)
        return (torch.softmax(flat / self.log_tau.exp(), dim=-1) * flat).sum(-1)


class TwoWide(nn.Module):
    """Not a GlobalPool and no out_features: width 2C is only visible from a forward."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1) * self.scale


@pytest.fixture
def temperature(scratch_registry: None) -> str:
    pooling.register("temperature", kind="global", formula="Σ softmax(x/τ) x", reference="test", learnable=True)(
        Temperature
    )
    return "temperature"


def test_public_api_is_exported() -> None:
    for name in ("register", "GlobalPool", "LocalPool", "from_config", "label", "learned_scalars"):
        assert name in pooling.__all__ and hasattr(pooling, name)


def test_registered_operator_is_a_config_option_with_typed_parameters(temperature: str) -> None:
    assert temperature in pooling.names() and temperature in group_options("pooling")
    cfg = compose([f"pooling={temperature}", "pooling.tau=1e4"])
    assert cfg.pooling.tau == 1e4 and run_id(cfg).startswith("temperature-")
    assert isinstance(pooling.from_config(compose([f"pooling={temperature}", "pooling.tau=2"]).pooling), Temperature)
    with pytest.raises(ConfigError, match=r"^pooling.tau must be of type float \(like the default 1.0\), got 'abc'$"):
        compose([f"pooling={temperature}", "pooling.tau=abc"])
    with pytest.raises(ConfigError, match=r"^pooling.hard must be of type bool"):
        compose([f"pooling={temperature}", "pooling.hard=3"])
    with pytest.raises(ConfigError, match=r"unknown parameter 'tu' for global pooling 'temperature'. Valid: tau, hard"):
        compose([f"pooling={temperature}", "+pooling.tu=3"])


def test_glob_matches_registered_operators_but_not_custom(temperature: str) -> None:
    swept = [run[1][0] for run in sweep.expand(["pooling=glob(*)"])]
    assert f"pooling={temperature}" in swept and "pooling=custom" not in swept
    assert len(swept) == len(pooling.names())


def test_unregistered_operator_is_no_option_any_more(scratch_registry: None) -> None:
    pooling.register("ephemeral", kind="global", formula="-", reference="-")(Temperature)
    assert "ephemeral" in group_options("pooling")
    registry._REGISTRY["global"].pop("ephemeral")
    assert "ephemeral" not in group_options("pooling")


def test_float_parameter_gets_a_float_from_an_int() -> None:
    pool = pooling.from_config({"name": "gmp", "lam": 10})
    assert isinstance(pool.lam, float) and pool.lam == 10.0


def test_from_config_decides_which_keys_are_parameters() -> None:
    pool = pooling.from_config({"name": "gem", "lr_mult": 10, "p": 4})
    assert math.isclose(float(pool.p.detach()), 4.0, rel_tol=1e-6)
    local = pooling.from_config(
        {"name": "lpnorm", "kernel_size": None, "stride": None, "lr_mult": 1, "p": 2.5}, "local", kernel_size=3
    )
    assert (local.kernel_size, local.stride, local.padding, local.p) == (3, 3, 0, 2.5)
    node_geometry = pooling.from_config({"name": "max", "kernel_size": 3, "stride": 1}, "local")
    assert (node_geometry.kernel_size, node_geometry.stride) == (3, 1)
    assert pooling.from_config({"name": "max", "kernel_size": 3}, "local", kernel_size=2).kernel_size == 2


def test_target_builds_any_module_with_its_kwargs() -> None:
    node = {"name": "custom", "_target_": f"{__name__}.TwoWide", "lr_mult": 1, "scale": 2}
    pool = pooling.from_config(node)
    assert isinstance(pool, TwoWide) and pool.scale == 2.0
    assert pooling.label(node) == "TwoWide"
    local = pooling.from_config({"_target_": "torch.nn.MaxPool2d"}, "local", kernel_size=3, stride=2)
    assert isinstance(local, nn.MaxPool2d) and (local.kernel_size, local.stride) == (3, 2)


def test_target_through_config_and_model() -> None:
    from poolbench.models import build_model

    cfg = compose(["pooling=custom", f"pooling._target_={__name__}.TwoWide", "+pooling.scale=0.5"])
    assert run_id(cfg).startswith("TwoWide-smallcnn-")
    model = build_model(
        cfg.model, cfg.pooling, cfg.local_pooling, in_channels=1, input_size=32, num_classes=3, task="classification"
    )
    assert model.pool_out_features == 2 * model.feature_channels  # width from the dummy forward
    local = compose(["local_pooling=custom", "local_pooling._target_=torch.nn.AvgPool2d"])
    model = build_model(
        cfg.model, cfg.pooling, local.local_pooling, in_channels=1, input_size=32, num_classes=3, task="classification"
    )
    assert any(isinstance(m, nn.AvgPool2d) for m in model.features.modules())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pooling=custom"], "pooling=custom needs the operator class: add pooling._target_="),
        (["local_pooling=custom"], "local_pooling=custom needs the operator class"),
        (["pooling=custom", "pooling._target_=nowhere.Pool"], "cannot import it (ModuleNotFoundError"),
        (["pooling=custom", "pooling._target_=math.pi"], "is not an nn.Module class"),
        (["pooling=custom", f"pooling._target_={__name__}.TwoWide", "+pooling.scale=x"], "pooling.scale must be"),
        (["pooling=custom", f"pooling._target_={__name__}.TwoWide", "+pooling.q=1"], "pooling=TwoWide: "),
        (["pooling=gem", "+pooling._target_=torch.nn.Flatten"], "read only with pooling=custom"),
        (["pooling=dgmp", "pooling.lam=null"], "pooling.lam must not be null"),
    ],
)
def test_operator_config_errors_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_custom_is_reserved() -> None:
    with pytest.raises(RuntimeError, match="reserved"):
        pooling.register("custom", kind="global", formula="-", reference="-")


def test_label_is_the_registered_name_or_the_class_name() -> None:
    assert pooling.label({"name": "dgmp", "lam": 5}) == "dgmp"
    assert pooling.label({"name": "custom", "_target_": "a.b.MyPool"}) == "MyPool"


def test_learned_scalars_prefer_learned_values() -> None:
    assert pooling.learned_scalars(Temperature(tau=2.0)) == pytest.approx({"log_tau": math.log(2.0)})

    class Natural(Temperature):
        def learned_values(self) -> dict[str, float]:
            return {"tau": float(self.log_tau.detach().exp())}

    assert pooling.learned_scalars(Natural(tau=2.0)) == pytest.approx({"tau": 2.0})
    assert pooling.learned_scalars(pooling.create("netvlad", clusters=2, in_channels=3)) == {}
