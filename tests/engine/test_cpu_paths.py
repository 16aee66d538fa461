"""The GPU-oriented code paths of training run on CPU too: bf16 autocast, channels_last, torch.compile,
and the solver-based pools (DGMP/GMP) under autocast. CUDA-only behaviour is tested in test_evaluate_latency."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_train import TRAINER, small_model, train  # pytest puts this folder on sys.path
from torch import nn

from poolbench import pooling
from poolbench.data.base import DataBundle
from poolbench.engine import fit


def conv_output_dtypes(model: nn.Module) -> list[torch.dtype]:
    """Record the output dtype of every convolution of ``model`` during training."""
    seen: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("pool", ["avg", "dgmp"])
def test_explicit_bf16_trains_under_autocast_on_cpu(tiny_retrieval: DataBundle, tmp_path: Path, pool: str) -> None:
    model = small_model(tiny_retrieval, pool)
    seen = conv_output_dtypes(model)
    summary = fit(model, tiny_retrieval, {**TRAINER, "amp": "bf16"}, device=torch.device("cpu"), seed=0,
                  run_dir=tmp_path, pool_lr_mult=1.0)
    assert seen and set(seen) == {torch.bfloat16}  # the convolutions really ran in bf16
    assert torch.isfinite(torch.tensor(summary["train_loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32

    plain = small_model(tiny_retrieval, pool)
    seen_plain = conv_output_dtypes(plain)
    fit(plain, tiny_retrieval, TRAINER, device=torch.device("cpu"), seed=0, run_dir=tmp_path / "fp32", pool_lr_mult=1.0)
    assert set(seen_plain) == {torch.float32}  # amp=auto is off on CPU


@pytest.mark.parametrize("name", ["dgmp", "gmp"])
def test_solver_pools_solve_in_full_precision_under_autocast(name: str) -> None:
    if name not in pooling.names():
        pytest.skip(f"{name} is not registered")
    pool = pooling.create(name)
    x = torch.randn(2, 8, 5, 5).relu().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pool(x)
    exact = pool(x.float())  # same bf16-rounded input, solved in fp32 without autocast
    assert torch.isfinite(mixed.float()).all()
    torch.testing.assert_close(mixed.float(), exact, rtol=2e-2, atol=2e-2)  # only bf16 output rounding apart


def test_channels_last_on_cpu(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    model, summary = train(tiny_retrieval, tmp_path / "nhwc", channels_last=True)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    reference_model, reference = train(tiny_retrieval, tmp_path / "nchw", channels_last=False)
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in
                   (m.weight for m in reference_model.modules() if isinstance(m, nn.Conv2d)))
    assert summary["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-3, abs=1e-4)


def test_compile_on_cpu(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile (inductor) needs a C++ compiler on CPU and none is installed")
    model, summary = train(tiny_retrieval, tmp_path / "compiled", compile=True, epochs=1, steps_per_epoch=2)
    _, eager = train(tiny_retrieval, tmp_path / "eager", epochs=1, steps_per_epoch=2)
    assert summary["train_steps"] == 2
    assert summary["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3, abs=1e-4)
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())  # checkpoints hold the plain model
