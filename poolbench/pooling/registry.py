"""Name → operator registry for global and local pooling, and the one way to build an operator from config.

Operators register themselves with :func:`register` (public API: plugins use it too); :func:`create`
and :func:`create_local` instantiate them by name. :func:`from_config` builds an operator from a
``pooling`` / ``local_pooling`` config node — a registered ``name`` or a Hydra-style ``_target_`` class
path — and is the only place that decides which keys of a node are operator parameters. An unknown
name or parameter is an error that names the valid choices: never a silent fallback to another
operator (timm #2159).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from poolbench.errors import ConfigError, unknown_choice
from poolbench.pooling.catalog import (  # the torch-free half of what the registry knows
    CUSTOM,
    GROUP_OF,
    LOCAL_DEFAULTS,
    LOCAL_GEOMETRY,
    NODE_KEYS,
    Kind,
    OperatorInfo,
    is_target,
    operator_name,
)


class GlobalPool(nn.Module):
    """A global pool: (B, C, H, W) -> (B, F). Subclasses override ``out_features`` when F != C."""

    def out_features(self, channels: int) -> int:
        return channels


class LocalPool(nn.Module):
    """A local (downsampling) pool: (B, C, H, W) -> (B, C, H', W').

    Output size follows ``nn.MaxPool2d`` (floor mode): H' = (H + 2·padding − kernel_size) // stride + 1.
    """

    def __init__(self, kernel_size: int = 2, stride: int | None = None, padding: int = 0) -> None:
        super().__init__()
        stride = kernel_size if stride is None else stride
        for arg, value, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}")
        if padding > kernel_size // 2:
            raise ValueError(f"padding must be at most kernel_size // 2 = {kernel_size // 2}, got {padding}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


@dataclass(frozen=True)
class PoolSpec(OperatorInfo):
    """What the registry knows about one operator: its description and its class."""

    cls: type[nn.Module] | None = None


_REGISTRY: dict[Kind, dict[str, PoolSpec]] = {"global": {}, "local": {}}
T = TypeVar("T", bound=type[nn.Module])


def _signature(cls: type[nn.Module], kind: Kind) -> tuple[dict[str, Any], dict[str, Any]]:
    """(defaults, annotated types) of the constructor's parameters, without the local geometry."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that cannot be evaluated only costs its type check
        hints = {}
    defaults, kinds = {}, {}
    for pname, p in inspect.signature(cls.__init__).parameters.items():
        if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if kind == "local" and pname in LOCAL_GEOMETRY:
            continue
        defaults[pname] = None if p.default is inspect.Parameter.empty else p.default
        kinds[pname] = hints.get(pname, Any)
    return defaults, kinds


def register(
    name: str,
    *,
    kind: Kind,
    formula: str,
    reference: str,
    learnable: bool = False,
    width: str = "C",
    lr_mult: float = 1,
) -> Callable[[T], T]:
    """Class decorator adding an operator to the registry under ``name`` (public API)::

        @register("softmax", kind="global", formula="Σ softmax(x/τ)_i x_i", reference="...", learnable=True)
        class SoftmaxPool(GlobalPool):
            def __init__(self, tau: float = 1.0) -> None: ...

    The constructor's signature gives the operator's config parameters, their defaults and (from its
    annotations) their types. ``lr_mult`` multiplies the learning rate of the operator's own parameters
    (they also get no weight decay); ``width`` documents F (e.g. ``"C"`` or ``"K·C"``).
    """
    if name == CUSTOM:
        raise RuntimeError(f"'{CUSTOM}' is reserved for pooling=custom pooling._target_=<class>")

    def wrap(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register({name!r}) decorates an nn.Module class, not {cls!r}")
        if name in _REGISTRY[kind]:
            raise RuntimeError(f"{kind} pooling '{name}' is registered twice")
        defaults, kinds = _signature(cls, kind)
        _REGISTRY[kind][name] = PoolSpec(
            name, kind, formula, reference, learnable, width, defaults, lr_mult, kinds, cls=cls
        )
        return cls

    return wrap


def _table(kind: Kind) -> dict[str, PoolSpec]:
    from poolbench import plugins

    plugins.load_process_plugins()
    return _REGISTRY[kind]


def _lookup(name: str, kind: Kind) -> PoolSpec:
    table = _table(kind)
    if name not in table:
        raise ValueError(unknown_choice(f"{kind} pooling", name, table))
    return table[name]


def _check_params(spec: PoolSpec, params: dict[str, Any]) -> None:
    extra = sorted(set(params) - set(spec.params))
    if extra:
        valid = ", ".join(spec.params) or "none"
        raise ValueError(f"unknown parameter '{extra[0]}' for {spec.kind} pooling '{spec.name}'. Valid: {valid}")


def spec(name: str, kind: Kind = "global") -> PoolSpec:
    return _lookup(name, kind)


# The built-in families in the order their operators are listed. A family imported first (a program's
# `import poolbench.pooling.gmp`) finishes registering after the ones the registry loads meanwhile: the
# list is put in this order, not in the order the imports happened to run (plugins follow, as registered).
BUILTIN_FAMILIES = (
    "poolbench.pooling.basic",
    "poolbench.pooling.gmp",
    "poolbench.pooling.local",
    "poolbench.pooling.structured",
)


def specs(kind: Kind) -> list[PoolSpec]:
    rank = {module: i for i, module in enumerate(BUILTIN_FAMILIES)}
    return sorted(_table(kind).values(), key=lambda s: rank.get(getattr(s.cls, "__module__", ""), len(rank)))


def create(name: str, **params: Any) -> GlobalPool:
    """Instantiate the global pool ``name``: a module mapping (B, C, H, W) -> (B, F)."""
    s = _lookup(name, "global")
    _check_params(s, params)
    return s.cls(**params)


def create_local(name: str, kernel_size: int = 2, stride: int | None = None, **params: Any) -> LocalPool:
    """Instantiate the local pool ``name``; ``stride`` defaults to ``kernel_size``."""
    s = _lookup(name, "local")
    _check_params(s, {k: v for k, v in params.items() if k != "padding"})
    return s.cls(kernel_size=kernel_size, stride=stride, **params)


def names() -> list[str]:
    return [s.name for s in specs("global")]


def local_names() -> list[str]:
    return [s.name for s in specs("local")]


# ------------------------------------------------------------------------------ config nodes → operators


def _plain(node: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def _checked(group: str, params: dict[str, Any], kinds: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``params`` type-checked against the constructor's annotations (the config schemas' rules), an
    int passed as float to a float parameter and a list as tuple to a tuple parameter."""
    from poolbench import schema

    out = {}
    for key, value in params.items():
        kind = kinds.get(key, Any)
        if kind is Any and defaults.get(key) is not None:  # unannotated: the default's type, as for other keys
            kind = type(defaults[key])
        schema.check_value(value, kind, f"{group}.{key}", defaults.get(key))
        members = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
        if isinstance(value, int) and not isinstance(value, bool) and float in members and int not in members:
            value = float(value)
        elif isinstance(value, list) and any(m is tuple or typing.get_origin(m) is tuple for m in members):
            value = tuple(value)
        out[key] = value
    return out


def target_class(path: Any, group: str = "pooling") -> type[nn.Module]:
    """The nn.Module class at dotted ``path`` (Hydra's ``_target_``); ConfigError naming it otherwise."""
    from poolbench import plugins

    if path in (None, "", "???"):
        raise ConfigError(
            f"{group}={CUSTOM} needs the operator class: add {group}._target_=<module>.<Class> "
            f"(an nn.Module, e.g. {group}._target_=mypkg.pools.MyPool)"
        )
    cls = plugins.import_target(str(path), group)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{group}._target_={path} is not an nn.Module class")
    return cls


def from_config(node: Mapping[str, Any], kind: Kind = "global", **geometry: Any) -> nn.Module:
    """Build the operator a ``pooling`` (``kind="global"``) or ``local_pooling`` (``"local"``) node describes.

    ``node["name"]`` is a registered operator, or ``custom`` (or absent) with ``node["_target_"]`` a
    dotted nn.Module class path, Hydra-style. Every key but ``name``, ``lr_mult``, ``_target_`` and the
    local geometry (``kernel_size``, ``stride``, ``padding``) is a constructor parameter, type-checked
    against the constructor's annotations (an int is accepted, and passed as float, for a float
    parameter). Local pools get ``kernel_size``/``stride``/``padding`` from ``geometry`` where given
    (not None), else from the node where set there, else their constructor's defaults.
    Any problem is one-line :class:`~poolbench.errors.ConfigError` naming the config key.
    """
    group = GROUP_OF[kind]
    data = _plain(node)
    params = {k: v for k, v in data.items() if k not in NODE_KEYS}
    if is_target(data):
        cls = target_class(data.get("_target_"), group)
        defaults, kinds = _signature(cls, kind)
    else:
        name = data.get("name")
        if "_target_" in data:
            raise ConfigError(f"{group}._target_ is read only with {group}={CUSTOM}, not with {group}={name}")
        try:
            s = _lookup(str(name), kind)
            _check_params(s, params)
        except ValueError as exc:
            raise ConfigError(f"{group}={name}: {exc}") from None
        cls, defaults, kinds = s.cls, s.params, s.types
    checked = _checked(group, params, kinds, defaults)
    if kind == "local":  # the contract of a local pool's constructor: LocalPool's geometry arguments
        for key, default in LOCAL_DEFAULTS.items():
            given = geometry.get(key)
            checked[key] = given if given is not None else data.get(key) if data.get(key) is not None else default
    try:
        return cls(**checked)
    except KeyboardInterrupt:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{group}={operator_name(data)}: {exc}") from None
    except BaseException as exc:  # a user's constructor asserting (or exiting): one line naming it
        from poolbench.errors import first_line

        raise ConfigError(f"{group}={operator_name(data)}: constructing it failed: {first_line(exc)}") from None


def learned_scalars(module: nn.Module) -> dict[str, float]:
    """Every learnable scalar of a pool in its natural unit: the module's ``learned_values()`` when it
    defines one (DGMP's λ rather than the log λ it learns), else its one-element parameters as they are."""
    own = getattr(module, "learned_values", None)
    if callable(own):
        return {str(k): float(v) for k, v in own().items()}
    return {name: p.detach().float().item() for name, p in module.named_parameters() if p.numel() == 1}


# The built-in operators register themselves when their modules load; loading the registry loads them,
# so every lookup (and every test saving and restoring _REGISTRY) sees them.
from poolbench.pooling import basic, gmp, local, structured  # noqa: E402, F401 - BUILTIN_FAMILIES
