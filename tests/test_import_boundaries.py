"""The lightweight commands load no model code: each runs in a fresh interpreter and the modules it
imported (``sys.modules`` at exit) are checked against what it must not load. Import time dominates
these commands (torch alone takes seconds, torchvision twice that), so a stray top-level import
would make them slow again without failing any other test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from poolbench import records

# What no lightweight command may import: the backbone libraries and the training code.
MODEL_CODE = (
    "torchvision",
    "timm",
    "poolbench.run",
    "poolbench.engine.train",
    "poolbench.engine.evaluate",
    "poolbench.engine.checkpoint",
    "poolbench.engine.latency",
    "poolbench.bench",
    "matplotlib",
)
# Commands that read no config and no operator: not even torch, omegaconf's configs or pandas.
NOTHING_HEAVY = (*MODEL_CODE, "torch", "numpy", "pandas", "hydra", "poolbench.pooling", "poolbench.config")

# What a command that composes configs with the default choices may not import either: torch. The
# operators, models and datasets are described torch-free (poolbench.pooling.catalog, the schema modules).
NO_TORCH = (*MODEL_CODE, "torch", "poolbench.pooling.registry", "poolbench.models.net", "poolbench.data.base")

# (command, modules it must not import).
LIGHT_COMMANDS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("--help",), NOTHING_HEAVY),
    (("--version",), NOTHING_HEAVY),
    *(((name, "--help"), NOTHING_HEAVY) for name in ("train", "sweep", "report", "bench", "check", "list", "tune")),
    (("train", "--cfg"), NO_TORCH),
    (("train", "--cfg", "pooling=dgmp", "augment=cifar", "dataset=digits"), NO_TORCH),
    (("train", "--cfg", "local_pooling=softpool", "pooling=spp"), NO_TORCH),
    (("train", "--cfg", "dataset=retrieval_folder", "model=custom"), NO_TORCH),  # required values shown, unset
    (("sweep", "--dry-run", "pooling=avg,max", "seed=0,1"), NO_TORCH),
    (("sweep", "--dry-run", "pooling=glob(*)", "local_pooling=max,lpnorm", "trainer.lr=0.1,0.01"), NO_TORCH),
    (("list", "groups"), NO_TORCH),
    (("list",), NO_TORCH),
    # records keep their options' defaults (part.<group>.defaults), so report tables compose nothing: no torch
    (("report", "{results}", "--baseline", "avg", "--no-plots", "--out", "{out}"), (*MODEL_CODE, "torch")),
]

PROBE = """
import json, sys
sys.argv = ["poolbench", *json.loads(sys.argv[1])]
from poolbench.cli import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
print("\\n@@MODULES@@" + json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _commands() -> list[str]:
    from poolbench.cli import app

    return [command.name or command.callback.__name__ for command in app.registered_commands]


def _write_records(folder: Path) -> None:
    for pooling, values in {"avg": (0.60, 0.62, 0.61), "max": (0.63, 0.64, 0.66)}.items():
        for seed, value in enumerate(values):
            run_id = f"{pooling}-smallcnn-synthwriters-s{seed}-{seed:012d}"
            record = {
                "run_id": run_id, "status": "completed", "pooling": pooling, "model": "smallcnn",
                "dataset": "synthwriters", "seed": seed, "choice.dataset": "synthwriters",
                "choice.model": "smallcnn", "choice.pooling": pooling, "choice.local_pooling": "none",
                "cfg.seed": seed, "cfg.pooling.name": pooling, "mAP": value,
                "part.pooling.defaults": json.dumps({"name": pooling, "lr_mult": 1.0}),  # as provenance writes it
            }  # fmt: skip
            records.atomic_write_json(folder / run_id / records.RECORD, record)


def _cases() -> list[pytest.param]:
    present = set(_commands())
    cases = []
    for argv, forbidden in LIGHT_COMMANDS:
        if argv[0] not in present and not argv[0].startswith("-"):
            continue  # a command this version does not have (e.g. `tune` on a branch without it)
        cases.append(pytest.param(argv, forbidden, id=" ".join(argv)))
    return cases


# Values that only torch can judge load it (the lazy path): a plugin, a torchvision architecture (its
# list), an operator parameter off its default (the constructor checks it), a `_target_` operator.
PLUGIN = """
from poolbench.pooling import GlobalPool, register


@register("boundary_probe", kind="global", formula="max_i x_i", reference="tests/test_import_boundaries.py")
class BoundaryProbe(GlobalPool):
    def forward(self, x):
        return x.amax(dim=(2, 3))
"""
NEEDS_TORCH: list[tuple[str, ...]] = [
    ("train", "--cfg", "plugins=[./boundary_pools.py]", "pooling=boundary_probe"),
    ("train", "--cfg", "model=resnet18"),
    ("train", "--cfg", "pooling=gem", "pooling.p=4"),
    ("train", "--cfg", "local_pooling=lpnorm", "local_pooling.kernel_size=3"),
    ("train", "--cfg", "pooling=custom", "pooling._target_=boundary_pools.BoundaryProbe"),
    ("sweep", "--dry-run", "pooling=gem", "pooling.p=2,4"),
]


def _loaded(argv: tuple[str, ...], tmp_path: Path) -> set[str]:
    """The modules ``poolbench <argv>`` imported in a fresh interpreter (which must exit 0)."""
    results = tmp_path / "runs"
    _write_records(results)
    (tmp_path / "boundary_pools.py").write_text(PLUGIN)
    args = [a.format(results=results, out=tmp_path / "report") for a in argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    env.pop("POOLBENCH_PLUGINS", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        capture_output=True, text=True, cwd=tmp_path, env={**env, "COLUMNS": "200"}, timeout=300,
    )  # fmt: skip
    assert "@@MODULES@@" in done.stdout, done.stderr[-2000:]
    report = json.loads(done.stdout.rsplit("@@MODULES@@", 1)[1])
    assert report["code"] == 0, done.stderr[-2000:]
    return set(report["modules"])


@pytest.mark.parametrize("argv", NEEDS_TORCH, ids=" ".join)
def test_values_only_torch_can_judge_load_it(argv: tuple[str, ...], tmp_path: Path) -> None:
    assert "torch" in _loaded(argv, tmp_path), f"`poolbench {' '.join(argv)}` judged its values without torch"


@pytest.mark.parametrize(("argv", "forbidden"), _cases())
def test_light_command_imports_no_model_code(argv: tuple[str, ...], forbidden: tuple[str, ...], tmp_path: Path) -> None:
    loaded = _loaded(argv, tmp_path)
    offending = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not offending, f"`poolbench {' '.join(argv)}` imported {offending[:12]}"


def test_every_command_has_a_light_help_case() -> None:
    """A new command joins the list above (its --help at least), so the boundary covers it."""
    helped = {argv[0] for argv, _ in LIGHT_COMMANDS if argv[1:] == ("--help",)}
    assert set(_commands()) <= helped, sorted(set(_commands()) - helped)


def test_engine_names_stay_functions_after_their_modules_load() -> None:
    """poolbench.engine loads its names on first use; importing a submodule must not replace a name
    with the module of the same name (``poolbench.engine.evaluate`` is the function)."""
    code = (
        "import types, poolbench.engine.settings, poolbench.engine.evaluate, poolbench.engine.train\n"
        "from poolbench import engine\n"
        "from poolbench.engine import evaluate\n"
        "assert not isinstance(evaluate, types.ModuleType) and callable(evaluate), evaluate\n"
        "assert engine.evaluate is evaluate and callable(engine.fit) and callable(engine.measure_latency)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _modules(package: str) -> list[str]:
    """Every module of a poolbench package, found on disk (no import needed to list them)."""
    root = Path(__file__).resolve().parents[1] / package.replace(".", "/")
    return sorted(
        ".".join(p.relative_to(root.parents[package.count(".")]).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py")
    )


# The operator and model packages load lazily and their modules import one another: each must work as the
# first import of a program (a plugin that imports `poolbench.pooling.basic` before anything else).
@pytest.mark.parametrize(
    "module",
    [
        pytest.param(m, marks=() if m.startswith(("poolbench.pooling", "poolbench.models")) else pytest.mark.slow)
        for m in _modules("poolbench")
        if not m.endswith("__main__")
    ],
)
def test_every_module_can_be_imported_first(module: str) -> None:
    code = (
        f"import {module}\n"
        "from poolbench import pooling\n"
        "assert 'dgmp' in pooling.names() and 'sort' in pooling.local_names(), 'built-ins registered'\n"
        "from poolbench.pooling import catalog\n"
        "assert catalog.render() == open(catalog.path(), encoding='utf-8').read(), 'listed in the shipped order'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
