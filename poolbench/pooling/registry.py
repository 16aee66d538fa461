"""Name → operator registry for global and local pooling.

Operators register themselves with :func:`register`; :func:`create` and :func:`create_local`
instantiate them by name. An unknown name or parameter is a ``ValueError`` that names the valid
choices: never a silent fallback to another operator (timm #2159).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from torch import nn

from poolbench.errors import unknown_choice

Kind = Literal["global", "local"]
# Constructor arguments every local operator takes; they are not listed as operator parameters.
LOCAL_GEOMETRY = ("kernel_size", "stride", "padding")


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
class PoolSpec:
    """What the registry knows about one operator (shown by ``poolbench list``)."""

    name: str
    kind: Kind
    cls: type[nn.Module]
    formula: str
    reference: str
    learnable: bool
    width: str = "C"
    params: dict[str, Any] = field(default_factory=dict)
    lr_mult: float = 1

    def config_node(self) -> dict[str, Any]:
        """The operator's config group node (``pooling=<name>`` / ``local_pooling=<name>``): its name, the
        learning-rate multiplier of its own parameters and its constructor's parameters with their
        defaults. Local pools also take ``kernel_size``/``stride`` (null: inherit the replaced max-pool's)."""
        geometry = {"kernel_size": None, "stride": None} if self.kind == "local" else {}
        return {"name": self.name, **geometry, "lr_mult": self.lr_mult, **self.params}


_REGISTRY: dict[Kind, dict[str, PoolSpec]] = {"global": {}, "local": {}}
T = TypeVar("T", bound=type[nn.Module])


def _signature_params(cls: type[nn.Module], kind: Kind) -> dict[str, Any]:
    params = {}
    for pname, p in inspect.signature(cls.__init__).parameters.items():
        if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if kind == "local" and pname in LOCAL_GEOMETRY:
            continue
        params[pname] = None if p.default is inspect.Parameter.empty else p.default
    return params


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
    """Class decorator adding an operator to the registry under ``name``.

    ``lr_mult`` multiplies the learning rate of the operator's own parameters (they also get no weight
    decay); the constructor's signature gives the parameters and their defaults.
    """

    def wrap(cls: T) -> T:
        if name in _REGISTRY[kind]:
            raise RuntimeError(f"{kind} pooling '{name}' is registered twice")
        _REGISTRY[kind][name] = PoolSpec(
            name, kind, cls, formula, reference, learnable, width, _signature_params(cls, kind), lr_mult
        )
        return cls

    return wrap


def _lookup(name: str, kind: Kind) -> PoolSpec:
    from poolbench import pooling  # noqa: F401  (importing the package registers every operator)

    table = _REGISTRY[kind]
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


def specs(kind: Kind) -> list[PoolSpec]:
    from poolbench import pooling  # noqa: F401

    return list(_REGISTRY[kind].values())


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


def learned_scalars(module: nn.Module) -> dict[str, float]:
    """Every learnable scalar of a pool in its natural unit: the module's ``learned_values()`` when it
    defines one (DGMP's λ rather than the log λ it learns), else its one-element parameters as they are."""
    own = getattr(module, "learned_values", None)
    if callable(own):
        return {str(k): float(v) for k, v in own().items()}
    return {name: p.detach().float().item() for name, p in module.named_parameters() if p.numel() == 1}
