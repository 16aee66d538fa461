"""Plugins: entry points, ``plugins=[...]`` and ``POOLBENCH_PLUGINS``, recorded and part of the run identity;
the example plugin package installed and used by list, check and sweeps (spawned workers, submitit)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poolbench import plugins, pooling
from poolbench.config import compose, identity, run_id
from poolbench.errors import ConfigError
from poolbench.pooling import registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin"
TINY = ["dataset=digits", "trainer.epochs=1", "trainer.steps_per_epoch=2", "trainer.latency.enabled=false"]


def plugin_source(name: str, body: str = "return x.amax((2, 3))") -> str:
    return textwrap.dedent(
        f"""
        from poolbench.pooling import GlobalPool, register

        @register("{name}", kind="global", formula="max", reference="a test plugin")
        class Pool(GlobalPool):
            def __init__(self, scale: float = 1.0) -> None:
                super().__init__()
                self.scale = scale

            def forward(self, x):
                {body}
        """
    )


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever a test's plugins register or import is forgotten afterwards."""
    saved = {kind: dict(table) for kind, table in registry._REGISTRY.items()}
    modules, loaded = set(sys.modules), dict(plugins._loaded)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(plugins, "_entry_points_state", {"loaded": False, "error": None})
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    yield
    for kind, table in saved.items():
        registry._REGISTRY[kind].clear()
        registry._REGISTRY[kind].update(table)
    for name in set(sys.modules) - modules:  # the tests' own plugin modules, never torch's lazy imports
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(tempfile.gettempdir()):
            del sys.modules[name]
    plugins._loaded.clear()
    plugins._loaded.update(loaded)
    plugins._named.clear()


def test_file_plugin_is_loaded_recorded_and_in_the_identity(tmp_path: Path, isolated: None) -> None:
    path = tmp_path / "my_pools.py"
    path.write_text(plugin_source("filemax"))
    spec = str(path)
    cfg = compose([f"plugins=[{spec}]", "pooling=filemax", "pooling.scale=2"])
    assert "filemax" in pooling.names() and run_id(cfg).startswith("filemax-")
    assert list(cfg.plugins) == [spec]
    assert cfg.plugins_sha256[spec] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert identity(cfg)[f"plugins_sha256.{spec}"] == cfg.plugins_sha256[spec]
    first = run_id(cfg)
    path.write_text(plugin_source("filemax", "return 2 * x.amax((2, 3))"))  # the operator changed
    assert run_id(compose([f"plugins=[{spec}]", "pooling=filemax", "pooling.scale=2"])) != first


def test_no_plugins_leave_the_identity_as_it_was(isolated: None) -> None:
    cfg = compose([])
    assert list(cfg.plugins) == [] and "plugins_sha256" not in cfg
    assert not any(key.startswith("plugins") for key in identity(cfg))


def test_environment_plugins_module_from_cwd_and_file(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "envpools.py").write_text(plugin_source("envmax"))
    (tmp_path / "other.py").write_text(plugin_source("envmin", "return x.amin((2, 3))"))
    monkeypatch.chdir(tmp_path)  # a module name is found in the working directory, like `python -m`
    monkeypatch.setenv(plugins.ENV_VAR, f"envpools{os.pathsep}./other.py")
    cfg = compose(["pooling=envmax"])
    assert list(cfg.plugins) == ["envpools", "./other.py"]
    assert set(cfg.plugins_sha256) == {"envpools", "./other.py"}
    assert compose(["pooling=envmin"]).pooling.name == "envmin"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("raise ZeroDivisionError('boom')", "failed to import: ZeroDivisionError: boom"),
        ("import not_a_module_anywhere", "ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
        ("import sys\nsys.exit(0)", "failed to import: SystemExit: 0"),  # never a silent exit 0
        (
            "from poolbench.pooling import register\n"
            "@register('fn', kind='global', formula='f', reference='r')\ndef fn(x):\n    return x",
            "TypeError: register('fn') decorates an nn.Module class",
        ),
    ],
)
def test_failing_plugin_is_one_line_exit_2_nothing_written(
    tmp_path: Path,
    isolated: None,
    run_cli: Callable[..., int],
    capsys: pytest.CaptureFixture,
    source: str,
    expected: str,
) -> None:
    bad = tmp_path / "bad_pools.py"
    bad.write_text(source)
    results = tmp_path / "runs"
    assert run_cli("train", f"plugins=[{bad}]", f"results_dir={results}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: plugin") and "bad_pools.py" in err and expected in err
    assert len(err.splitlines()) == 1 and not results.exists()


def test_missing_plugin_module_and_file(isolated: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^plugin 'nowhere_pools' failed to import: ModuleNotFoundError"):
        compose(["plugins=[nowhere_pools]"])
    with pytest.raises(ConfigError, match=r"^plugin '\./missing\.py': no such file"):
        compose(["+plugins=./missing.py"])


def test_entry_points_load_once_and_a_broken_one_keeps_failing(
    isolated: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "eppools.py").write_text(plugin_source("epmax"))
    monkeypatch.syspath_prepend(str(tmp_path))
    good = importlib.metadata.EntryPoint("epmax", "eppools", plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [good] if group == good.group else [])
    assert "epmax" in pooling.names()  # the first registry lookup imported it

    broken = importlib.metadata.EntryPoint("broken", "eppools_broken_nowhere", plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [broken])
    monkeypatch.setattr(plugins, "_entry_points_state", {"loaded": False, "error": None})
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"plugin 'eppools_broken_nowhere' \(entry point 'broken'\) failed"):
            pooling.names()


# ------------------------------------------------------------------------------ the example package


def _install_example(target: Path) -> None:
    """pip-install examples/plugin into ``target``; without setuptools, lay out what pip would: the
    package and a dist-info whose entry_points.txt comes from the example's pyproject."""
    source = target.parent / "plugin-src"
    shutil.copytree(EXAMPLE, source)  # building in place would leave build/ and *.egg-info in the checkout
    if importlib.util.find_spec("setuptools") is not None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                str(target),
                str(source),
            ],
            check=True,
        )
        return
    import tomllib  # Python >= 3.11; only this fallback needs it

    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    shutil.copytree(source / "poolbench_tempsoft", target / "poolbench_tempsoft")
    info = target / f"poolbench_tempsoft-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    group = plugins.ENTRY_POINT_GROUP
    lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in project["entry-points"][group].items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def example_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    target = tmp_path_factory.mktemp("site") / "packages"
    _install_example(target)
    path = os.pathsep.join([str(ROOT), str(target), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def poolbench(env: dict[str, str], *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom poolbench.cli import main\nsys.argv = ['poolbench', *sys.argv[1:]]\nmain()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


def _completed(results: Path) -> dict[str, dict]:
    records = [json.loads(p.read_text()) for p in results.glob("*/result.json")]
    return {r["pooling"]: r for r in records if r["status"] == "completed"}


@pytest.mark.slow
def test_example_plugin_list_check_and_sweep_with_spawned_workers(example_env: dict, tmp_path: Path) -> None:
    listing = poolbench(example_env, "list")
    assert listing.returncode == 0 and "tempsoft" in listing.stdout, listing.stderr
    checked = poolbench(example_env, "check", "tempsoft", "tau=0.5")
    assert checked.returncode == 0 and "0 failed" in checked.stdout, checked.stdout + checked.stderr
    results = tmp_path / "runs"
    swept = poolbench(example_env, "sweep", "pooling=avg,tempsoft", *TINY, f"results_dir={results}", "--jobs", "2")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert set(_completed(results)) == {"avg", "tempsoft"}
    report = poolbench(
        example_env, "report", str(results), "--baseline", "tempsoft", "--no-plots", "--out", str(tmp_path / "report")
    )
    assert report.returncode == 0 and "avg vs tempsoft" in report.stdout, report.stdout + report.stderr


@pytest.mark.slow
def test_example_and_file_plugins_in_submitit_local_jobs(example_env: dict, tmp_path: Path) -> None:
    plugin = tmp_path / "my_pools.py"
    plugin.write_text(plugin_source("mymax"))
    results = tmp_path / "runs"
    # This machine may have SLURM's sbatch: make submitit's AutoExecutor pick its local executor.
    local_only = "import submitit.slurm.slurm as s; s.SlurmExecutor.affinity = classmethod(lambda cls: -1)"
    swept = poolbench(
        example_env,
        "sweep",
        f"plugins=[{plugin}]",
        "pooling=tempsoft,mymax",
        *TINY,
        f"results_dir={results}",
        "--executor",
        "submitit",
        "--jobs",
        "2",
        "--timeout-min",
        "10",
        prelude=local_only,
    )
    assert swept.returncode == 0, swept.stdout + swept.stderr
    done = _completed(results)
    assert set(done) == {"tempsoft", "mymax"}
    assert len(list((results / ".submitit").rglob("*_result.pkl"))) == 2  # ran as submitit jobs
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert done["mymax"][f"cfg.plugins_sha256.{plugin}"] == digest
    assert done["mymax"]["cfg.plugins"] == [str(plugin)]


def test_check_loads_plugins_given_as_a_parameter(
    tmp_path: Path, isolated: None, run_cli: Callable[..., int], capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "checked_pools.py"
    path.write_text(plugin_source("checkedmax"))
    assert run_cli("check", "checkedmax", f"plugins=[{path}]", "scale=2") == 0
    assert "0 failed" in capsys.readouterr().out


def test_plugin_file_deleted_after_planning_is_one_line(tmp_path: Path, isolated: None) -> None:
    path = tmp_path / "gone_pools.py"
    path.write_text(plugin_source("gonemax"))
    compose([f"plugins=[{path}]", "pooling=gonemax"])  # planned: imported and hashed
    path.unlink()
    with pytest.raises(ConfigError, match=r"^plugin '.*gone_pools.py': cannot read its source .*FileNotFoundError"):
        compose([f"plugins=[{path}]", "pooling=gonemax"])


def test_every_command_takes_plugins_and_list_names_the_file(
    tmp_path: Path, isolated: None, run_cli: Callable[..., int], capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "listed_pools.py"
    path.write_text(plugin_source("listedmax"))
    assert run_cli("list", "--plugins", str(path)) == 0
    out = capsys.readouterr().out
    assert "listedmax" in out and "listed_pools.py" in out and "poolbench_plugin_" not in out
    assert run_cli("list", "local", f"plugins=[{path}]") == 0  # as the user tried it
    assert run_cli("list", f"plugins=[{path}]") == 0 and "listed_pools.py" in capsys.readouterr().out
    assert run_cli("check", "listedmax", "--plugins", str(path)) == 0
    cfg_out = run_cli("train", "--cfg", "pooling=listedmax", "--plugins", str(path))
    assert cfg_out == 0 and f"- {path}" in capsys.readouterr().out  # folded into plugins=[...]


def _records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*/result.json"))]


@pytest.mark.slow
def test_plugin_sweep_report_needs_no_plugin_and_its_commands_rerun_the_same_runs(
    tmp_path: Path, isolated: None, run_cli: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from poolbench import report as reporting
    from poolbench.report.html import commands

    monkeypatch.chdir(tmp_path)
    Path("my_pools.py").write_text(
        plugin_source("mymax").replace("scale: float = 1.0", "scale: float = 1.0, eps: float = 1e-6")
    )
    results = tmp_path / "runs"
    assert (
        run_cli(
            "sweep",
            "plugins=[./my_pools.py]",
            "pooling=avg,mymax",
            "seed=0,1",
            *TINY,
            "results_dir=runs",
            "--no-side-by-side",
        )
        == 0
    )
    records = _records(results)
    assert {r["part.pooling.formula"] for r in records} == {"mean_i x_i", "max"}
    with_plugin = reporting.build(results, baseline="avg")
    # the plugin gone (deleted, unregistered): the report reads the same from the records alone
    Path("my_pools.py").rename("elsewhere.py")
    registry._REGISTRY["global"].pop("mymax")
    del sys.modules[plugins._loaded.pop("./my_pools.py").__name__]
    reporting.core._option_values.cache_clear()
    without = reporting.build(results, baseline="avg")
    assert with_plugin.keys == without.keys == ["choice.pooling"]
    assert with_plugin.summary.equals(without.summary)
    lines = commands(without)
    assert all("'plugins=[./my_pools.py]'" in line and "plugins_sha256" not in line for line in lines), lines
    Path("elsewhere.py").rename("my_pools.py")
    ids = {r["run_id"] for r in records}
    for line in lines:
        words = shlex.split(line)[2:]
        seeds = next(w for w in words if w.startswith("seed=")).split("=")[1].split(",")
        kept = [w for w in words if not w.startswith("seed=")]
        assert {run_id(compose([*kept, f"seed={seed}"])) for seed in seeds} <= ids


def test_rebuilding_imports_only_named_code_with_the_recorded_sha256(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)  # a shared results folder, with code lying beside the runs
    marker = tmp_path / "imported"
    evil = f"open({str(marker)!r}, 'w').close()\nfrom torch import nn\nclass Pool(nn.Module):\n    pass\n"
    Path("evil_target.py").write_text(evil)
    Path("evil_pools.py").write_text(evil)
    recorded = OmegaConf.create({"pooling": {"name": "custom", "_target_": "evil_target.Pool"}, "plugins": []})
    with plugins.rebuilding(), pytest.raises(ConfigError, match=r"not imported; .* --plugins evil_target"):
        plugins.load_recorded(recorded)
    digest = hashlib.sha256(b"another file").hexdigest()
    recorded = OmegaConf.create({"plugins": ["./evil_pools.py"], "plugins_sha256": {"./evil_pools.py": digest}})
    with plugins.rebuilding(), pytest.raises(ConfigError, match=r"imported only when named: --plugins"):
        plugins.load_recorded(recorded)
    assert not marker.exists()  # nothing ran
    plugins.name(["./evil_pools.py"])  # named by the user: imported, but its sha256 is not the recorded one
    with plugins.rebuilding(), pytest.raises(ConfigError, match=r"not the recorded one"):
        plugins.load_recorded(recorded)
