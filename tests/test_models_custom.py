"""Your own backbone (model=custom model._target_=..., or a plugin registering a model option), and the
source fingerprint of `_target_` parts: trains, sweeps, reports, is rebuilt by `bench --runs` only when
named, refuses what it cannot do in one line."""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poolbench import plugins, schema
from poolbench.config import compose, run_id
from poolbench.errors import ConfigError
from poolbench.pooling import registry

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "dataset=digits",
    "trainer.epochs=1",
    "trainer.steps_per_epoch=2",
    "trainer.latency.enabled=false",
]


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from poolbench.config import _import_schema_owners

    _import_schema_owners()  # the built-in options exist before the snapshot
    saved = {kind: dict(table) for kind, table in registry._REGISTRY.items()}
    options = {g: dict(o) for g, o in schema._OPTIONS.items()}
    modules, loaded, named = set(sys.modules), dict(plugins._loaded), dict(plugins._named)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    yield
    for kind, table in saved.items():
        registry._REGISTRY[kind].clear()
        registry._REGISTRY[kind].update(table)
    schema._OPTIONS.clear()
    schema._OPTIONS.update(options)
    for name in set(sys.modules) - modules:  # the tests' own modules (never torch's lazily imported ones)
        file = str(getattr(sys.modules[name], "__file__", None) or "")
        if file.startswith((tempfile.gettempdir(), str(ROOT / "examples"))):
            del sys.modules[name]
    plugins._loaded.clear()
    plugins._loaded.update(loaded)
    plugins._named.clear()
    plugins._named.update(named)


def backbone_source(extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, in_channels: int = 3, width: int = 8) -> None:
                super().__init__()
                self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
                self.pool = nn.MaxPool2d(2)
                self.last = nn.Conv2d(width, width, 3, stride=2, padding=1)

            def forward(self, x):
                return self.last(self.pool(torch.relu(self.stem(x)))){extra}

        def flat(width: int = 4):
            return nn.Sequential(nn.Flatten())
        """
    )


def test_custom_backbone_trains_with_surgery_and_is_in_the_record(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from poolbench.run import execute

    (tmp_path / "netmod.py").write_text(backbone_source())
    monkeypatch.chdir(tmp_path)
    overrides = ["model=custom", "model._target_=netmod.Net", "+model.width=4", *TINY, f"results_dir={tmp_path}/r"]
    plain = execute(compose(overrides))
    assert plain["status"] == "completed" and plain["model"] == "Net"
    assert (plain["feature_map_h"], plain["feature_map_w"]) == (4, 4)  # 32 → stem /2 → pool /2 → last /2
    defaults = json.loads(plain["part.model.defaults"])
    assert defaults["_target_"] == "netmod.Net" and defaults["width"] == 8  # the factory's own default
    # cifar_stem: stride-1 stem, no stem max-pool; last_stride=1: the last conv at stride 1
    edited = execute(compose([*overrides, "model.cifar_stem=true", "model.last_stride=1"]))
    assert (edited["feature_map_h"], edited["feature_map_w"]) == (32, 32)
    local = execute(compose([*overrides, "local_pooling=avg"]))
    assert local["status"] == "completed" and local["local_pooling"] == "avg"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=custom"], "model._target_ is required"),
        (["model=custom", "model._target_=netmod.nowhere"], "model._target_=netmod.nowhere: cannot import it"),
        (["model=custom", "model._target_=netmod.flat"], "model flat returns (2, 1024), not a (B, C, h, w)"),
        (["model=custom", "model._target_=torch.nn.Identity", "model.cifar_stem=true"], "has no convolution"),
        (["model=custom", "model._target_=netmod.Net", "+model.width=-1"], "constructing it failed: RuntimeError"),
        (["model=custom", "model._target_=netmod.Net", "model.pretrained=true"], "load its weights in its factory"),
        (
            [
                "pooling=custom",
                "pooling._target_=torch.nn.MultiheadAttention",
                "+pooling.embed_dim=5",
                "+pooling.num_heads=2",
            ],
            "pooling=MultiheadAttention: constructing it failed: AssertionError",
        ),
        (["pooling=custom", "pooling._target_=netmod.DoublePool"], "returned float64 from a float32 map"),
    ],
)
def test_custom_parts_fail_in_one_line(
    tmp_path: Path,
    isolated: None,
    monkeypatch: pytest.MonkeyPatch,
    run_cli: Callable[..., int],
    capsys: pytest.CaptureFixture,
    overrides: list[str],
    expected: str,
) -> None:
    source = backbone_source() + textwrap.dedent(
        """
        class DoublePool(nn.Module):
            def forward(self, x):
                return x.mean((2, 3)).double()
        """
    )
    (tmp_path / "netmod.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", *overrides, *TINY, f"results_dir={tmp_path}/r") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # nothing written


def test_edited_target_class_is_a_new_run_and_other_ids_stay(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tgt.py").write_text(
        "from torch import nn\nclass P(nn.Module):\n    def forward(self, x):\n        return x.mean((2, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    overrides = ["pooling=custom", "pooling._target_=tgt.P"]
    first = compose(overrides)
    assert first.pooling._source_sha256 and run_id(first).startswith("P-")
    (tmp_path / "tgt.py").write_text((tmp_path / "tgt.py").read_text().replace("mean", "amax"))
    del sys.modules["tgt"]
    assert run_id(compose(overrides)) != run_id(first)
    assert "_source_sha256" not in compose([]).pooling  # runs without _target_ keep their ids


def test_plugin_backbone_option_and_readme_example(
    tmp_path: Path, isolated: None, run_cli: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the README's commands run from a checkout
    monkeypatch.syspath_prepend(str(ROOT))
    results = tmp_path / "r"
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [
        line for line in readme if line.startswith("poolbench") and "examples.my_backbone" in line.replace("/", ".")
    ]
    assert len(commands) == 3  # train with _target_, train with the plugin, sweep
    for command in commands:  # as written, shortened to a few steps
        words = shlex.split(command)[1:]
        extra = ["--no-side-by-side"] if words[0] == "sweep" else []
        assert run_cli(*words, *TINY, f"results_dir={results}", *extra) == 0, command
    records = {r["model"]: r for r in (json.loads(p.read_text()) for p in results.glob("*/result.json"))}
    assert set(records) == {"TinyRes", "tinyres"}
    assert records["tinyres"]["part.model.source"] == "my_backbone.py"
    with pytest.raises(ConfigError, match="model.depth must be of type int"):
        compose(["plugins=[examples/my_backbone.py]", "model=tinyres", "model.depth=abc"])


@pytest.mark.slow
def test_custom_backbone_sweeps_reports_reruns_and_is_benchmarked(
    tmp_path: Path,
    isolated: None,
    run_cli: Callable[..., int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from poolbench import report as reporting
    from poolbench.report.html import commands

    (tmp_path / "netmod.py").write_text(backbone_source())
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "runs"
    base = ["model=custom", "model._target_=netmod.Net", *TINY]
    assert run_cli("sweep", *base, "pooling=avg,gem", "seed=0,1", f"results_dir={results}", "--no-side-by-side") == 0
    built = reporting.build(results, baseline="avg")
    assert built.keys == ["choice.pooling"] and set(built.runs["choice.model"]) == {"Net"}
    ids = set(built.runs["run_id"])
    for line in commands(built):  # the printed commands compose the same runs again
        words = shlex.split(line)[2:]
        seeds = next(w for w in words if w.startswith("seed=")).split("=")[1].split(",")
        kept = [w for w in words if not w.startswith("seed=")]
        assert {run_id(compose([*kept, f"seed={s}"])) for s in seeds} <= ids
    capsys.readouterr()
    # bench --runs: the `_target_` module is not imported from a fresh process's point of view unless named
    del sys.modules["netmod"]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert run_cli("bench", "--runs", str(results), "--repeats", "1", "--warmup", "0") == 2
    assert "--plugins netmod" in capsys.readouterr().err
    assert run_cli("bench", "--runs", str(results), "--repeats", "1", "--warmup", "0", "--plugins", "./netmod.py") == 0
    timed = json.loads((results / "side_by_side.json").read_text())
    assert {row["pooling"] for row in timed["rows"]} == {"avg", "gem"} and not timed["skipped"]


def test_small_map_warning_fits_the_config_and_is_printed_once(
    tmp_path: Path, run_cli: Callable[..., int], capsys: pytest.CaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    from poolbench.models import small_map_warning

    message = small_map_warning({"cifar_stem": True, "last_stride": None}, (2, 2), {"image_size": 32})
    assert message and "dataset.image_size" in message and "cifar_stem" not in message
    assert "model.cifar_stem=true" in small_map_warning({"cifar_stem": False}, (1, 1))
    assert small_map_warning({"cifar_stem": False}, (3, 3)) is None
    overrides = ["model=torchvision", "model.arch=mobilenet_v3_small", "model.cifar_stem=true", *TINY]
    assert run_cli("train", *overrides, f"results_dir={tmp_path}") == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("global pools barely differ") == 1
    assert not [w for w in recwarn if "barely differ" in str(w.message)]
