from __future__ import annotations

import pytest
import torch

from poolbench.data.base import DataBundle
from poolbench.engine import evaluate, measure_latency, time_fn
from poolbench.models import build_model

LATENCY_KEYS = {
    "infer_batch_ms",
    "infer_batch_ms_iqr",
    "infer_image_ms",
    "train_step_ms",
    "train_step_ms_iqr",
    "pool_fwd_ms",
    "pool_fwdbwd_ms",
    "peak_mem_mb",
    "device_name",
    "timing_warning",
}


def model_for(data: DataBundle, pooling: str = "avg") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        {"name": "smallcnn", "width": 4, "depth": 2, "embedding_dim": 8},
        {"name": pooling},
        {"name": "none"},
        in_channels=data.in_channels,
        input_size=data.input_size,
        num_classes=data.num_classes,
        task=data.task,
    )


def test_evaluate_retrieval_uses_mean_of_normalised_patch_embeddings(tiny_retrieval: DataBundle) -> None:
    model = model_for(tiny_retrieval)
    result = evaluate(model, tiny_retrieval, device=torch.device("cpu"), batch_size=5)
    assert set(result) == {"mAP", "top1"} | {f"{kind}@{k}" for kind in ("soft", "hard") for k in (1, 2, 3, 4)}
    assert model.training  # mode restored

    from poolbench.metrics import writer_retrieval

    model.eval()
    with torch.no_grad():
        x, pages = tiny_retrieval.test.tensors
        emb = torch.nn.functional.normalize(model(x), dim=1)
    descriptors = torch.stack([emb[pages == p].mean(0) for p in range(len(tiny_retrieval.page_writers))])
    assert result == pytest.approx(writer_retrieval(descriptors, tiny_retrieval.page_writers), abs=1e-6)


def test_evaluate_classification(tiny_classification: DataBundle) -> None:
    model = model_for(tiny_classification)
    calls: list[tuple[str, int, int]] = []
    result = evaluate(
        model, tiny_classification, device=torch.device("cpu"), batch_size=6, progress=lambda *a: calls.append(a)
    )
    assert set(result) == {"acc@1", "acc@5"} and 0 <= result["acc@1"] <= result["acc@5"] == 1.0  # 4 classes
    assert calls[-1] == ("evaluate", 3, 3)


@pytest.mark.parametrize(
    ("fixture", "loss", "pooling"), [("tiny_retrieval", "triplet", "gem"), ("tiny_classification", "ce", "avg")]
)
def test_measure_latency_keys_and_no_side_effects(
    request: pytest.FixtureRequest, fixture: str, loss: str, pooling: str
) -> None:
    data = request.getfixturevalue(fixture)
    model = model_for(data, pooling)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    result = measure_latency(
        model,
        input_shape=(data.in_channels, data.input_size, data.input_size),
        device=torch.device("cpu"),
        batch_size=8,
        warmup=1,
        repeats=3,
        train_loss=loss,
    )
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    assert set(result) == LATENCY_KEYS
    assert all(
        result[k] > 0
        for k in LATENCY_KEYS - {"device_name", "timing_warning", "peak_mem_mb", "infer_batch_ms_iqr", "train_step_ms_iqr"}
    )
    assert result["infer_image_ms"] == pytest.approx(result["infer_batch_ms"] / 8)
    assert result["peak_mem_mb"] >= 0 and "threads" in result["device_name"]
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BN stats


def test_time_fn_counts_calls() -> None:
    calls = []
    stats = time_fn(lambda: calls.append(1), device=torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7 and stats.n == 5 and stats.median_ms >= 0 and stats.iqr_ms >= 0
    with pytest.raises(ValueError):
        time_fn(lambda: None, device=torch.device("cpu"), warmup=0, repeats=0)
