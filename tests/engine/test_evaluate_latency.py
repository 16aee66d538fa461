from __future__ import annotations

import pytest
import torch

from poolbench.data.base import DataBundle
from poolbench.engine import evaluate, measure_cost, measure_latency, time_fn
from poolbench.environment import device_name
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
    assert set(result) == {"acc@1"} and 0 <= result["acc@1"] <= 1.0  # 4 classes: acc@5 would be 1 by construction
    assert calls[-1] == ("evaluate", 3, 3)
    with pytest.raises(ValueError, match="has no 'val' split"):
        evaluate(model, tiny_classification, device=torch.device("cpu"), batch_size=6, split="val")


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
    not_positive = {"device_name", "timing_warning", "peak_mem_mb", "infer_batch_ms_iqr", "train_step_ms_iqr"}
    assert all(result[k] > 0 for k in LATENCY_KEYS - not_positive)
    assert result["infer_image_ms"] == pytest.approx(result["infer_batch_ms"] / 8)
    assert result["peak_mem_mb"] >= 0 and result["device_name"] == device_name("cpu")  # the env's form
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BN stats


def test_time_fn_counts_calls() -> None:
    calls = []
    stats = time_fn(lambda: calls.append(1), device=torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7 and stats.n == 5 and stats.median_ms >= 0 and stats.iqr_ms >= 0
    with pytest.raises(ValueError):
        time_fn(lambda: None, device=torch.device("cpu"), warmup=0, repeats=0)


def test_interleaved_samples_time_every_function_each_round_in_shuffled_order() -> None:
    from poolbench.engine.latency import interleaved_samples

    calls: list[str] = []

    def recorder(key: str) -> object:
        return lambda: calls.append(key)

    def broken() -> None:
        raise RuntimeError("no kernel\nsecond line")

    samples, errors = interleaved_samples(
        {"a": recorder("a"), "b": recorder("b"), "c": recorder("c"), "x": broken}, warmup=1, rounds=6
    )
    assert errors == {"x": "RuntimeError: no kernel"} and samples["x"] == []
    assert all(len(samples[k]) == 6 for k in "abc")
    timed = calls[3:]  # after one warm-up call each
    rounds = [timed[i : i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every function once per round
    assert len({tuple(r) for r in rounds}) > 1  # and not always in the same order


def test_interval_brackets_the_median_and_is_reproducible() -> None:
    from poolbench.engine.latency import interval, median_iqr, paired_ratios

    values = [1.0, 1.2, 0.9, 1.1, 5.0, 1.05, 0.95]
    low, high = interval(values)
    assert low <= median_iqr(values)[0] <= high and (low, high) == interval(values)
    assert interval([2.0]) == (2.0, 2.0) and interval([3.0, 3.0]) == (3.0, 3.0)
    ratio, ci = paired_ratios([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])  # per-round ratios, not ratio of medians
    assert ratio == 2.0 and ci == (2.0, 2.0)


def test_timing_warnings_name_the_load_and_thread_oversubscription(monkeypatch: pytest.MonkeyPatch) -> None:
    from poolbench.engine import latency

    monkeypatch.setattr(latency, "usable_cores", lambda: 2)
    monkeypatch.setattr(latency.os, "getloadavg", lambda: (7.5, 1.0, 1.0))
    monkeypatch.setattr(latency, "copy_bandwidth_gb_s", lambda threads: 10.0 / threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        warnings = latency.timing_warnings(torch.device("cpu"))
    finally:
        torch.set_num_threads(previous)
    assert warnings == [
        "load average 7.5 > 2 usable cores",
        "4 torch threads > 2 usable cores",
        "copy bandwidth 2.5 GB/s with 4 threads vs 10 GB/s with 1",
    ]
    monkeypatch.setattr(latency.os, "getloadavg", lambda: (0.5, 1.0, 1.0))
    monkeypatch.setattr(latency, "copy_bandwidth_gb_s", lambda threads: 10.0)
    torch.set_num_threads(1)
    try:
        assert latency.timing_warnings(torch.device("cpu")) == []
    finally:
        torch.set_num_threads(previous)


def test_count_flops_adds_analytic_counts_for_linear_algebra_and_elementwise_ops() -> None:
    from poolbench.engine.flops import count_flops

    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7  # FlopCounterMode's own count
    spd = torch.eye(6).expand(4, 6, 6).contiguous() * 2
    assert count_flops(lambda: torch.linalg.cholesky_ex(spd)) == 4 * 6**3 // 3
    rhs = torch.randn(4, 6, 2)
    assert count_flops(lambda: torch.cholesky_solve(rhs, spd)) == 2 * 6**2 * 4 * 2
    assert count_flops(lambda: torch.linalg.solve_triangular(spd, rhs, upper=False)) == 6**2 * 4 * 2
    x = torch.randn(2, 3, 8, 8)
    assert count_flops(lambda: x * 2) == x.numel()  # pointwise: one per output element
    assert count_flops(lambda: x.sum((2, 3))) == x.numel()  # reduction: one per input element
    assert count_flops(lambda: torch.nn.functional.avg_pool2d(x, 2)) == 2 * 3 * 4 * 4 * 4
    assert count_flops(lambda: x.view(6, 64).clone()) == 0  # data movement
    assert count_flops(lambda: torch.nn.functional.adaptive_max_pool2d(x, 2)) == x.numel()
    rows = torch.randn(4, 8)
    assert count_flops(lambda: rows.sort(dim=1)) == 4 * 8 * 3  # n log2 n per row
    assert count_flops(lambda: rows.topk(4, dim=1)) == 4 * 8 * 2  # n log2 k per row


def test_measure_cost_of_a_model_and_its_pool(tiny_classification: DataBundle) -> None:
    from poolbench.engine.flops import count_flops

    data = tiny_classification
    model = model_for(data, "dgmp")
    shape = (data.in_channels, data.input_size, data.input_size)
    torch.manual_seed(5)
    expected_next = torch.rand(2)
    torch.manual_seed(5)
    cost = measure_cost(model, shape)
    assert torch.equal(torch.rand(2), expected_next) and model.training
    assert cost["params"] == sum(p.numel() for p in model.parameters())
    height, width = model.feature_map_size
    fmap = torch.randn(1, model.feature_channels, height, width)
    with torch.no_grad():
        assert cost["pool_flops"] == count_flops(lambda: model.pool(fmap))  # the solve's size, not the data
    assert 0 < cost["pool_flops"] < cost["flops_per_image"]
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert cost["flops_per_image"] > 2 * conv.weight.numel()  # at least the first convolution at one position
