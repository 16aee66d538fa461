"""Your own backbone: ``model=custom model._target_=pkg.mod.Factory``, or a name a plugin registers.

The factory is an ``nn.Module`` class, or any callable returning one, whose forward maps images
(B, in_channels, H, W) to a feature map (B, C, h, w). Its keyword arguments are config keys: added
with ``+model.width=32`` for ``model=custom``, or declared by :func:`register` from its signature
(``model.width=32``, typed like an operator's parameters). A factory that takes ``in_channels`` gets
the dataset's; otherwise its first convolution is adapted. Then it is treated exactly like a
torchvision or timm trunk (:mod:`poolbench.models.surgery`): its global pool is the configured one,
its ``nn.MaxPool2d`` layers are what ``local_pooling`` replaces, the head is sized from the pool's
width, and ``cifar_stem`` / ``last_stride`` act where the module allows (one line where not). The
sha256 of the factory's source file is in the run's identity (``model._source_sha256``).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from poolbench.errors import ConfigError
from poolbench.models.settings import BackboneSettings
from poolbench.schema import Required, option

LIBRARY = "custom"
# The factory's own argument that receives the dataset's channel count (not a config key).
IN_CHANNELS = "in_channels"
# Keys of a custom model node that are not the factory's arguments.
NODE_KEYS = frozenset({*(f.name for f in dataclasses.fields(BackboneSettings)), "_target_", "_source_sha256"})


@dataclass
class CustomSettings(BackboneSettings):
    """``model=custom``: any nn.Module class or factory returning a (B, C, h, w) feature map."""

    name: str = "custom"
    # pkg.mod.Factory: a class or function importable from the working directory or PYTHONPATH.
    _target_: Annotated[str | None, Required("the backbone factory, e.g. model._target_=my_backbone.TinyRes")] = None


option("model", "custom", CustomSettings, meta={"library": LIBRARY, "open": True})


def _parameters(factory: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """(name, annotation, default) of the factory's keyword arguments, ``in_channels`` left out."""
    try:
        hints = typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)
    except Exception:  # noqa: BLE001  (an annotation that cannot be evaluated only costs its type check)
        hints = {}
    out = []
    for pname, p in inspect.signature(factory).parameters.items():
        if pname in (IN_CHANNELS, "self") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        hint = hints.get(pname, Any if default is None else type(default))
        if p.default is inspect.Parameter.empty:
            hint = Annotated[hint | None, Required(f"an argument of {getattr(factory, '__name__', factory)}")]
        out.append((pname, hint, default))
    return out


def register(name: str, factory: Callable[..., Any], **meta: Any) -> None:
    """Make ``model=<name>`` build ``factory`` (public API for plugins)::

        from poolbench.models import custom
        custom.register("tinyres", TinyRes)    # in a file given as plugins=[./my_backbone.py]

    The factory's keyword arguments become ``model.<arg>`` keys with their defaults and annotated types.
    """
    if not callable(factory):
        raise TypeError(f"register({name!r}) takes an nn.Module class or a function returning one, not {factory!r}")
    fields = [(p, hint, dataclasses.field(default=default)) for p, hint, default in _parameters(factory)]
    settings = dataclasses.make_dataclass(
        f"{name.title().replace('_', '')}Settings",
        [("name", str, dataclasses.field(default=name)), ("_target_", str | None, None), *fields],
        bases=(CustomSettings,),
    )
    option("model", name, settings, meta={"library": LIBRARY, "open": True, "factory": factory, **meta})


def factory_of(node: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[Callable[..., Any], str]:
    """The factory a custom model node names (a registered one, or its ``_target_``) and its label."""
    if meta.get("factory") is not None:
        return meta["factory"], str(node["name"])
    from poolbench import plugins

    path = node.get("_target_")
    if path in (None, "", "???"):
        raise ConfigError(
            "model=custom needs the backbone: add model._target_=<module>.<Factory> "
            "(an nn.Module class or a function returning one, e.g. model._target_=my_backbone.TinyRes)"
        )
    factory = plugins.import_target(str(path), "model")
    if not callable(factory):
        raise ConfigError(f"model._target_={path} is not a class or function")
    return factory, str(path)


def params(node: Mapping[str, Any]) -> dict[str, Any]:
    """The factory's keyword arguments from a model node (every key that is not a backbone setting)."""
    return {k: v for k, v in node.items() if k not in NODE_KEYS}


def build(node: Mapping[str, Any], meta: Mapping[str, Any], in_channels: int) -> Any:
    """The module the factory returns, with ``in_channels`` passed when it takes it."""
    from torch import nn

    factory, what = factory_of(node, meta)
    if node.get("pretrained"):
        raise ConfigError(f"model.pretrained=true: {what} is your own module; load its weights in its factory")
    kwargs = params(node)
    try:
        accepts = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts = {}
    if IN_CHANNELS in accepts:
        kwargs[IN_CHANNELS] = in_channels
    try:
        module = factory(**kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # the user's constructor: any failure (an assert, a SystemExit) is one line
        from poolbench.errors import first_line

        raise ConfigError(f"model {what}: constructing it failed: {first_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model {what} returned {type(module).__name__}, not an nn.Module")
    return module
