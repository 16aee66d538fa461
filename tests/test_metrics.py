from __future__ import annotations

import numpy as np
import pytest
import torch

from poolbench.metrics import accuracy, writer_retrieval


def reference_retrieval(x: np.ndarray, writers: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Plain-loop leave-one-out evaluation with the same conventions (ties by lower index)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    aps, top1, soft, hard = [], [], {k: [] for k in ks}, {k: [] for k in ks}
    for q in range(len(x)):
        others = [i for i in range(len(x)) if i != q]
        ranked = sorted(others, key=lambda i: (-float(x[q] @ x[i]), i))
        rel = [writers[i] == writers[q] for i in ranked]
        if not any(rel):
            continue
        hits, precisions = 0, []
        for rank, r in enumerate(rel, start=1):
            if r:
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / hits)
        top1.append(float(rel[0]))
        for k in ks:
            soft[k].append(float(any(rel[:k])))
            hard[k].append(float(all(rel[:k])))
    out = {"mAP": float(np.mean(aps)), "top1": float(np.mean(top1))}
    for k in ks:
        out[f"soft@{k}"] = float(np.mean(soft[k]))
        out[f"hard@{k}"] = float(np.mean(hard[k]))
    return out


def test_hand_computed_case_with_ties_and_a_query_without_relevant_items() -> None:
    # Item: vector, writer.   0: (1,0) A   1: (0,1) B   2: (0,1) A (= item 1)   3: (1,1) B   4: (-1,0) C
    # Cosines are exact here (0, ±1, ±1/√2), so equal values really tie; ties rank the lower index first.
    #   q0 (A): 3 (.71), then 1 and 2 tie at 0 → 1, 2; then 4 (−1).  rel 0 0 1 0  AP = 1/3
    #   q1 (B): 2 (1), 3 (.71), then 0 and 4 tie at 0 → 0, 4.       rel 0 1 0 0  AP = 1/2
    #   q2 (A): 1 (1), 3 (.71), then 0 and 4 tie at 0 → 0, 4.       rel 0 0 1 0  AP = 1/3
    #           (had 4 gone before 0, AP would be 1/4)
    #   q3 (B): 0, 1, 2 tie at .71 → 0, 1, 2; then 4.              rel 0 1 0 0  AP = 1/2
    #           (by another tie rule item 1 could be first: AP 1)
    #   q4 (C): no other page of writer C → not scored.
    # mAP = (1/3 + 1/2 + 1/3 + 1/2) / 4 = 5/12;  top1 = hard@1 = 0;  soft@2 = (0 + 1 + 0 + 1) / 4 = 1/2;
    # soft@3 = 1;  hard@2 = hard@3 = 0 (a single relevant item per scored query).
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    writers = ["A", "B", "A", "B", "C"]
    ids = [ord(w) for w in writers]
    result = writer_retrieval(x, ids, ks=(1, 2, 3))
    assert result["mAP"] == pytest.approx(5 / 12)
    assert result["top1"] == 0.0
    assert result["soft@1"] == 0.0 and result["soft@2"] == 0.5 and result["soft@3"] == 1.0
    assert result["hard@1"] == 0.0 and result["hard@2"] == 0.0 and result["hard@3"] == 0.0
    assert result == pytest.approx(reference_retrieval(x, np.array(ids), ks=(1, 2, 3)))


def test_perfect_ranking() -> None:
    # Two writers × 3 pages, each writer's pages nearly identical: every AP = 1, hard@2 = 1, hard@3 = 0
    # (only 2 other pages of the same writer exist).
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [0.0, 1.0], [0.01, 1.0], [0.02, 1.0]])
    result = writer_retrieval(x, torch.tensor([7, 7, 7, 9, 9, 9]), ks=(1, 2, 3, 10))
    assert result["mAP"] == 1.0 and result["top1"] == 1.0
    assert result["hard@2"] == 1.0 and result["hard@3"] == 0.0
    assert result["soft@10"] == 1.0  # k beyond the 5 other items is clipped to 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_plain_loop_reference_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 6))
    x[5] = x[3]  # exact ties
    x[17] = x[3]
    writers = rng.integers(0, 12, size=40)
    ks = (1, 2, 3, 4)
    assert writer_retrieval(x, writers, ks) == pytest.approx(reference_retrieval(x, writers, ks), abs=1e-12)


def test_keys_and_errors() -> None:
    result = writer_retrieval(torch.randn(10, 3), torch.arange(10) // 2)
    assert set(result) == {"mAP", "top1"} | {f"{kind}@{k}" for kind in ("soft", "hard") for k in (1, 2, 3, 4)}
    with pytest.raises(ValueError, match="every writer has a single item"):
        writer_retrieval(torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match="NaN"):
        writer_retrieval(torch.tensor([[float("nan"), 1.0], [1.0, 1.0]]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="expected descriptors"):
        writer_retrieval(torch.randn(4, 3), torch.arange(3))


def test_retrieval_is_fast_on_500_pages() -> None:
    import time

    x, writers = torch.randn(500, 128), torch.arange(500) // 5
    start = time.perf_counter()
    writer_retrieval(x, writers)
    assert time.perf_counter() - start < 1.0


def test_accuracy_by_hand() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    labels = torch.tensor([1, 1, 0, 1])
    # top-1 predictions: 1, 0, 2, 0 (tie 0/1 → lower index 0) → hits 1 0 0 0 → 1/4
    # top-2 sets: {1,0} {0,1|2 tie → 1} {2,1} {0,1} → hits 1 1 0 1 → 3/4
    # k=5 (and k=3) >= 3 classes: every label is in the top k, acc@k would be 1 whatever the model → left out
    assert accuracy(logits, labels, ks=(1, 2, 3, 5)) == {"acc@1": 0.25, "acc@2": 0.75}
    assert set(accuracy(np.zeros((2, 10)), [0, 1])) == {"acc@1", "acc@5"}
    assert set(accuracy(np.zeros((2, 5)), [0, 1])) == {"acc@1"}  # acc@5 of 5 classes is 1 by construction
