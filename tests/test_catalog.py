"""The torch-free description of the built-in operators (poolbench.pooling.catalog) is the registrations'
own: generated from them, checked here against them, and trusted only where it cannot differ from
constructing the operator."""

from __future__ import annotations

import pytest

from poolbench import config, pooling
from poolbench.errors import ConfigError
from poolbench.pooling import catalog, registry

KINDS = ("global", "local")


def test_shipped_catalog_is_generated_from_the_registrations() -> None:
    shipped = catalog.path().read_text(encoding="utf-8")
    assert shipped == catalog.render(), f"{catalog.path()} is stale: run `{catalog.REGENERATE}` and commit it"


@pytest.mark.parametrize("kind", KINDS)
def test_catalog_describes_every_builtin_operator_as_registered(kind: str) -> None:
    builtins = {s.name: s for s in registry.specs(kind) if s.cls.__module__.startswith("poolbench.pooling.")}
    shipped = catalog.builtin(kind)
    assert list(shipped) == list(builtins)
    for name, spec in builtins.items():
        info = shipped[name]
        assert (info.params, info.types, info.formula, info.reference) == (
            spec.params, spec.types, spec.formula, spec.reference
        ), name  # fmt: skip
        assert (info.learnable, info.width, info.lr_mult, info.config_node()) == (
            spec.learnable, spec.width, spec.lr_mult, spec.config_node()
        ), name  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "name"), [(kind, name) for kind in KINDS for name in catalog.builtin(kind)]  # type: ignore[arg-type]
)
def test_an_operator_as_declared_builds_and_is_trusted_without_torch(
    kind: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What valid_as_declared lets pass without building does build (composed as a user gets it)."""
    group = catalog.GROUP_OF[kind]  # type: ignore[index]
    root = config.validate_config(config.compose([f"{group}={name}"], validate=False))
    node = root[group]
    assert pooling.from_config(node, kind)  # type: ignore[arg-type]
    monkeypatch.setattr(catalog, "live", lambda: False)  # as in a process that has not imported torch
    assert catalog.valid_as_declared(node, kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("group", "node"),
    [
        ("pooling", {"name": "gem", "lr_mult": 10, "p": 4.0, "eps": 1e-06}),  # a value off its default
        ("pooling", {"name": "gem", "lr_mult": 10, "p": 3, "eps": 1e-06}),  # the default's value, not its type
        ("pooling", {"name": "gem", "lr_mult": 10, "p": 3.0}),  # a parameter removed
        ("pooling", {"name": "gem", "lr_mult": 10, "p": 3.0, "eps": 1e-06, "q": 1}),  # one added
        ("pooling", {"name": "nope", "lr_mult": 1}),
        ("pooling", {"name": "custom", "_target_": "x.Y", "lr_mult": 1}),
        ("pooling", {"name": "avg", "_target_": "x.Y", "lr_mult": 1}),
        ("local_pooling", {"name": "max", "kernel_size": 3, "stride": None, "lr_mult": 1}),  # geometry given
        ("local_pooling", {"name": "lpnorm", "kernel_size": None, "stride": None, "lr_mult": 1, "p": True}),
    ],
)
def test_anything_else_is_built_as_before(group: str, node: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    kind = "global" if group == "pooling" else "local"
    monkeypatch.setattr(catalog, "live", lambda: False)
    assert not catalog.valid_as_declared(node, kind)  # type: ignore[arg-type]


def test_a_loaded_registry_is_what_configs_see(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once torch is loaded (a plugin, a test), the registry, not the shipped file, lists the operators
    and validates every node (an operator unregistered since is no longer an option)."""
    assert catalog.live()
    monkeypatch.delitem(registry._REGISTRY["global"], "softpool")
    assert "softpool" not in [i.name for i in catalog.infos("global")]
    assert not catalog.valid_as_declared({"name": "avg", "lr_mult": 1}, "global")
    with pytest.raises(ConfigError, match="unknown global pooling 'softpool'"):
        pooling.from_config({"name": "softpool"}, "global")
