"""One definition per fact that several layers read: override keys, the device grammar, the device's
name, the usable core count, the operators' lr multipliers and the names runs and reports give their
parts. Each is checked through the callers that used to hold their own copy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from poolbench import config, executors, plugins
from poolbench.engine import latency, policies
from poolbench.environment import device_name, usable_cores
from poolbench.errors import ConfigError
from poolbench.grammar import DEVICES, check_device, override_key


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.lr=0.1", "trainer.lr"),
        ("+trainer.foo=1", "trainer.foo"),
        ("++trainer.foo=1", "trainer.foo"),
        ("~trainer.latency", "trainer.latency"),
        ("~trainer.latency=null", "trainer.latency"),
        ("plugins=[a.b,c=d]", "plugins"),
    ],
)
def test_override_key(override: str, key: str) -> None:
    assert override_key(override) == key


@pytest.mark.parametrize("override", ["plugins=[]", "+plugins=[]", "~plugins"])
def test_plugins_find_their_override_by_the_shared_key(override: str) -> None:
    # ~plugins=[...] used to be matched by plugins only: the same key everywhere now.
    assert plugins.requested([override, "plugins_x=[a]"]) == []
    assert plugins.requested(["pooling=avg"]) == []


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_grammar_accepts(device: str) -> None:
    assert check_device(device) == device


@pytest.mark.parametrize("device", ["gpu", "cuda0", "cpu:0", "mps", "cuda:", "CUDA", ""])
def test_one_device_message_from_the_config_and_the_engine(device: str) -> None:
    with pytest.raises(ConfigError) as grammar:
        check_device(device)
    message = str(grammar.value)
    assert message == f"device must be auto, cpu, cuda or cuda:<index>, got {device!r}"
    assert all(choice in message for choice in DEVICES)
    with pytest.raises(ConfigError) as engine:
        policies.resolve_device(device)
    assert str(engine.value) == message
    if device:  # device= (empty) is Hydra's null: refused by the schema before the grammar
        with pytest.raises(ConfigError) as composed:
            config.compose([f"device={device}"])
        assert str(composed.value) == message


def test_device_name_one_form_for_text_and_torch_devices() -> None:
    name = device_name("cpu")
    assert name and "threads" not in name  # env.num_threads records the threads
    assert device_name(torch.device("cpu")) == name
    assert latency.device_name is device_name  # the latency record names the device the same way


def test_device_name_of_the_cpu_imports_no_torch() -> None:
    code = "import sys; from poolbench.environment import device_name as d; d('cpu'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_usable_cores_follow_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cores() == 3
    assert executors.default_threads(1) == 3 and executors.default_threads(2) == 1  # the sweep's share
    assert executors.default_threads(8) == 1
    monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cores() == 64


def test_names_that_say_what_they_return() -> None:
    from poolbench import models, pooling
    from poolbench.report import column_label

    assert pooling.operator_name({"name": "custom", "_target_": "a.b.MyPool"}) == "MyPool"
    assert pooling.label is pooling.operator_name and models.label is models.backbone_name  # README's aliases
    assert models.backbone_name({"name": "torchvision", "arch": "resnet18"}) == "resnet18"
    assert [column_label(c) for c in ("choice.pooling", "cfg.trainer.lr", "mAP")] == ["pooling", "trainer.lr", "mAP"]


def test_lr_mults_default_to_one_like_the_registry() -> None:
    from poolbench.pooling import spec

    assert policies.lr_mults({"name": "avg"}, {"name": "none"}) == {"pool_lr_mult": 1.0, "local_pool_lr_mult": 1.0}
    cfg = config.compose(["pooling=lse", "local_pooling=max"])
    assert policies.lr_mults(cfg.pooling, cfg.local_pooling) == {
        "pool_lr_mult": float(spec("lse", "global").lr_mult),
        "local_pool_lr_mult": float(spec("max", "local").lr_mult),
    }
