"""Plugins: Python modules that register pooling operators (``poolbench.pooling.register``).

Three sources, all imported before a config is composed, so their operators are config options:

- installed packages declaring an entry point in the group ``poolbench.operators`` (imported on the
  first registry lookup of every process: CLI, ``--jobs N`` spawn workers, submitit/SLURM jobs);
- ``POOLBENCH_PLUGINS`` (``os.pathsep``- or comma-separated), inherited by every worker and job and
  likewise imported at every registry lookup;
- ``plugins=[mypkg.mypools,./my_pools.py]`` on the command line (pre-parsed from the overrides).

A spec is a module name, or a path to a ``.py`` file imported under a name derived from its absolute
path (stable across processes, so its classes pickle into spawned workers). The composed config's
``plugins`` lists every spec of a run (environment first) and ``plugins_sha256`` the sha256 of each
one's source, so both are in the run record and a changed operator is a different run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from poolbench.errors import ConfigError

ENTRY_POINT_GROUP = "poolbench.operators"
ENV_VAR = "POOLBENCH_PLUGINS"
CONFIG_KEY = "plugins"
HASH_KEY = "plugins_sha256"

_entry_points_state: dict[str, Any] = {"loaded": False, "error": None}
_loaded: dict[str, ModuleType] = {}  # spec → module, for the specs this process imported


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_entry_points() -> None:
    """Import every installed ``poolbench.operators`` entry point, once per process.

    A failing one raises ConfigError now and at every later lookup (never a half-loaded registry)."""
    state = _entry_points_state
    if state["error"] is not None:
        raise ConfigError(state["error"])
    if state["loaded"]:
        return
    state["loaded"] = True  # first: a plugin that looks operators up while importing must not recurse
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:
            state["error"] = f"plugin '{entry.value}' (entry point '{entry.name}') failed to import: {first_line(exc)}"
            raise ConfigError(state["error"]) from None


def from_env() -> list[str]:
    """The specs in ``POOLBENCH_PLUGINS``."""
    raw = os.environ.get(ENV_VAR, "")
    return [part.strip() for chunk in raw.split(os.pathsep) for part in chunk.split(",") if part.strip()]


def requested(overrides: Sequence[str]) -> list[str]:
    """The specs that ``plugins=[...]`` / ``+plugins=...`` overrides ask for (parsed like Hydra does)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    wanted = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == CONFIG_KEY]
    if not wanted:
        return []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=wanted)
    except OverrideParseException as exc:
        raise ConfigError(
            f"{str(exc).splitlines()[0]}. Plugins look like plugins=[mypkg.pools,./my_pools.py]"
        ) from None
    specs: list[str] = []
    for override in parsed:
        if override.is_delete():
            continue
        value = override.value()
        specs.extend(str(v) for v in (value if isinstance(value, list) else [value]) if v not in (None, ""))
    return specs


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _module_name(path: Path) -> str:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    return f"poolbench_plugin_{''.join(c if c.isalnum() else '_' for c in path.stem)}_{digest}"


def cwd_importable() -> None:
    """Let module specs and ``_target_`` paths name modules in the working directory, as ``python -m``
    does (the ``poolbench`` console script does not put it on ``sys.path``). Appended, so it never
    shadows an installed module."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _import_file(spec: str) -> ModuleType:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"plugin '{spec}': no such file ({path})")
    name = _module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"plugin '{spec}': not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before executing it: dataclasses and pickling look the module up
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load(specs: Iterable[str]) -> None:
    """Import each plugin (a module name or a .py file path) once; ConfigError naming a failing one."""
    for spec in specs:
        if spec in _loaded:
            continue
        try:
            if _is_path(spec):
                module = _import_file(spec)
            else:
                cwd_importable()
                module = importlib.import_module(spec)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"plugin '{spec}' failed to import: {first_line(exc)}") from None
        _loaded[spec] = module


def load_process_plugins() -> None:
    """The plugins every lookup of this process sees: installed entry points and ``POOLBENCH_PLUGINS``."""
    load_entry_points()
    load(from_env())


def prepare(overrides: Sequence[str]) -> None:
    """Before composing ``overrides``: import the installed, environment and command-line plugins."""
    load_process_plugins()
    load(requested(overrides))


def _source_files(module: ModuleType) -> list[Path]:
    if hasattr(module, "__path__"):  # a package: all of its Python files
        return sorted(p for folder in module.__path__ for p in Path(folder).rglob("*.py"))
    return [Path(module.__file__)] if getattr(module, "__file__", None) else []


def source_sha256(spec: str) -> str:
    """sha256 of a loaded plugin's source (a package's .py files, in path order, with their names)."""
    module = _loaded[spec]
    files = _source_files(module)
    if len(files) == 1:
        return hashlib.sha256(files[0].read_bytes()).hexdigest()
    digest = hashlib.sha256()
    root = Path(module.__path__[0]) if hasattr(module, "__path__") else Path()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def record(cfg: Any) -> None:
    """Write the run's plugins into its composed config: ``plugins`` (environment's, then the config's)
    and ``plugins_sha256.<spec>``; nothing changes for a run without plugins (its id stays)."""
    from omegaconf import open_dict

    specs = list(dict.fromkeys(from_env() + [str(s) for s in cfg.get(CONFIG_KEY) or []]))
    load(specs)
    if not specs:
        return
    with open_dict(cfg):
        cfg[CONFIG_KEY] = specs
        cfg[HASH_KEY] = {spec: source_sha256(spec) for spec in specs}
