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

from poolbench.errors import ConfigError, first_line
from poolbench.grammar import override_key

ENTRY_POINT_GROUP = "poolbench.operators"
ENV_VAR = "POOLBENCH_PLUGINS"
CONFIG_KEY = "plugins"
HASH_KEY = "plugins_sha256"

# Key that compose adds to every ``_target_`` node (``pooling._source_sha256``): the sha256 of the file
# defining the class. Inside the node, so it travels with the part it describes (a report separates
# two versions of one class as two treatments, not as a context key).
SOURCE_KEY = "_source_sha256"
# Groups whose node may name a class by ``_target_`` (Hydra's convention).
TARGET_GROUPS = ("model", "pooling", "local_pooling")

_entry_points_state: dict[str, Any] = {"loaded": False, "error": None}
_loaded: dict[str, ModuleType] = {}  # spec → module, for the specs this process imported
_named: dict[str, str] = {}  # spec the user named on this command line (--plugins) → its sha256 when loaded


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
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit at import too: a plugin must not end poolbench silently
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

    wanted = [o for o in overrides if override_key(o) == CONFIG_KEY]
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


def import_target(path: str, group: str) -> Any:
    """The object at dotted ``path`` (Hydra's ``_target_``), ConfigError naming it otherwise.

    Normally from the working directory too (as ``python -m`` does). While a run from a results folder
    is rebuilt (:func:`rebuilding`), only from a module already imported or one the user named
    (``--plugins``), never from the working directory: a results folder may come from someone else."""
    import pkgutil

    if _rebuild["active"]:
        _allow_target(path, group)
    else:
        cwd_importable()
    try:
        return pkgutil.resolve_name(path)  # what Hydra's get_class does, without its error log
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit at import too
        raise ConfigError(f"{group}._target_={path}: cannot import it ({first_line(exc)})") from None


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
        except (ConfigError, KeyboardInterrupt):
            raise
        except BaseException as exc:  # SystemExit at import too: a plugin must not end poolbench silently
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


def _read(file: Path, what: str) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:  # deleted or made unreadable since it was imported
        raise ConfigError(f"{what}: cannot read its source {file} ({first_line(exc)})") from None


def source_sha256(spec: str) -> str:
    """sha256 of a loaded plugin's source (a package's .py files, in path order, with their names)."""
    module = _loaded[spec]
    files = _source_files(module)
    if len(files) == 1:
        return hashlib.sha256(_read(files[0], f"plugin '{spec}'")).hexdigest()
    digest = hashlib.sha256()
    root = Path(module.__path__[0]) if hasattr(module, "__path__") else Path()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0" + _read(file, f"plugin '{spec}'") + b"\0")
    return digest.hexdigest()


def display_name(module_name: str, *, whole: bool = False) -> str:
    """How ``poolbench list`` and records name where a part comes from: a plugin file's name
    (``my_pools.py``), else the top-level package (``poolbench_tempsoft``; the whole dotted module
    with ``whole``, for a ``_target_``)."""
    for spec, module in _loaded.items():
        if module.__name__ == module_name and _is_path(spec):
            return Path(spec).name
    return module_name if whole else module_name.split(".")[0]


def class_source(cls: type) -> Path | None:
    """The file defining ``cls`` (its module's ``__file__``), or None for a class without one."""
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    return Path(file) if file else None


def class_sha256(cls: type, what: str) -> str:
    """sha256 of the file of the module that defines ``cls``: a ``_target_``'s source fingerprint."""
    file = class_source(cls)
    if file is None:
        raise ConfigError(f"{what}: {cls.__module__} has no source file to fingerprint")
    return hashlib.sha256(_read(file, what)).hexdigest()


def fingerprint_targets(cfg: Any) -> None:
    """Put ``<group>._source_sha256`` into every ``_target_`` node of a composed config (the sha256 of
    the defining module's file), so an edited class is a new run, as an edited plugin file is."""
    from omegaconf import open_dict

    for group in TARGET_GROUPS:
        node = cfg.get(group)
        if node is None or node.get("_target_") in (None, "", "???"):
            continue
        cls = import_target(str(node["_target_"]), group)  # a class, or a backbone's factory function
        with open_dict(cfg):
            node[SOURCE_KEY] = class_sha256(cls, f"{group}._target_={node['_target_']}")


def record(cfg: Any, *, fingerprint: bool = True) -> None:
    """Write the run's plugins into its composed config: ``plugins`` (environment's, then the config's)
    and ``plugins_sha256.<spec>``; nothing changes for a run without plugins (its id stays)."""
    from omegaconf import open_dict

    specs = list(dict.fromkeys(from_env() + [str(s) for s in cfg.get(CONFIG_KEY) or []]))
    load(specs)
    if fingerprint:
        fingerprint_targets(cfg)
    if not specs:
        return
    with open_dict(cfg):
        cfg[CONFIG_KEY] = specs
        cfg[HASH_KEY] = {spec: source_sha256(spec) for spec in specs}


# ------------------------------------------------------------------------ plugins the user names


def parse_cli(values: Sequence[str] | None) -> list[str]:
    """The specs of ``--plugins`` options (repeatable, each comma-separated; ``[a,b]`` accepted too)."""
    specs: list[str] = []
    for value in values or ():
        specs.extend(part.strip() for part in value.strip().strip("[]").split(",") if part.strip())
    return specs


def name(specs: Iterable[str]) -> list[str]:
    """Import the plugins the user names on a command line (``--plugins``) and remember them with their
    sha256: only these (and ``POOLBENCH_PLUGINS``) may be imported to rebuild a run from a results folder."""
    specs = list(dict.fromkeys(specs))
    load(specs)
    for spec in specs:
        _named[spec] = source_sha256(spec)
    return specs


def _named_specs() -> dict[str, str]:
    """Every plugin the user named: ``--plugins`` and the environment's, each with its sha256."""
    env = from_env()
    load(env)
    return {**{spec: source_sha256(spec) for spec in env}, **_named}


def _same_spec(recorded: str, named: str) -> bool:
    if recorded == named:
        return True
    if _is_path(recorded) and _is_path(named):
        return Path(recorded).expanduser().resolve() == Path(named).expanduser().resolve()
    return False


_rebuild: dict[str, bool] = {"active": False}


class rebuilding:  # noqa: N801  (a context manager, named like one)
    """While a run from a results folder is rebuilt: ``_target_`` paths resolve only to modules already
    imported or named by the user, never from the working directory (see :func:`import_target`)."""

    def __enter__(self) -> None:
        self._was = _rebuild["active"]
        _rebuild["active"] = True

    def __exit__(self, *exc: object) -> None:
        _rebuild["active"] = self._was


def _module_prefixes(path: str) -> list[str]:
    module = path.split(":", 1)[0] if ":" in path else path.rpartition(".")[0]
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1) if parts[0]]


def _allow_target(path: str, group: str) -> None:
    """Raise ConfigError unless resolving ``path`` imports only code the user named (or already loaded)."""
    prefixes = _module_prefixes(path)
    if any(prefix in sys.modules for prefix in prefixes):
        return
    top = prefixes[-1] if prefixes else path
    for spec in _named_specs():
        if not _is_path(spec) and spec.split(".")[0] == top:
            return
        if _is_path(spec) and Path(spec).stem == top:  # ./my_pools.py named for `_target_: my_pools.Pool`
            file = Path(spec).expanduser().resolve()
            module_spec = importlib.util.spec_from_file_location(top, file)
            if module_spec is None or module_spec.loader is None:
                break
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[top] = module
            try:
                module_spec.loader.exec_module(module)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                del sys.modules[top]
                raise ConfigError(f"plugin '{spec}' failed to import: {first_line(exc)}") from None
            return
    raise ConfigError(
        f"{group}._target_={path}: code named by a results folder is not imported; "
        f"to rebuild this run name its module: --plugins {top} (or --plugins ./{top}.py)"
    )


def load_recorded(cfg: Any) -> None:
    """Before rebuilding a recorded run: import its plugins only if the user named them and their
    sha256 is the recorded one, and check its ``_target_`` classes the same way. ConfigError (one line,
    the reason the run cannot be rebuilt) otherwise. Call inside :class:`rebuilding`."""
    named = _named_specs()
    hashes = cfg.get(HASH_KEY) or {}
    for spec in [str(s) for s in cfg.get(CONFIG_KEY) or []]:
        match = next((n for n in named if _same_spec(spec, n)), None)
        if match is None:
            raise ConfigError(f"uses plugin '{spec}', which is imported only when named: --plugins {spec}")
        if spec in hashes and hashes[spec] != named[match]:
            raise ConfigError(f"plugin '{match}' is not the recorded one (its sha256 differs from the run's)")
    for group in TARGET_GROUPS:
        node = cfg.get(group)
        target = node.get("_target_") if node is not None else None
        if target in (None, "", "???"):
            continue
        obj = import_target(str(target), group)
        recorded = node.get(SOURCE_KEY)
        if recorded is not None and class_sha256(obj, f"{group}._target_={target}") != recorded:
            raise ConfigError(f"{group}._target_={target} is not the recorded one (its source's sha256 differs)")
