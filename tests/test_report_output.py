"""`poolbench report` on whatever it finds: bad records, bad destinations, markup in values, atomic --out,
figures (curves from metrics.jsonl), side-by-side latency."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from test_report import make_record, write

from poolbench import records, report
from poolbench.errors import PoolbenchError


def _good(folder: Path, seeds: int = 3) -> Path:
    for seed in range(seeds):
        write(folder, make_record("avg", seed, **{"acc@1": 0.5 + seed / 100}))
        write(folder, make_record("gem", seed, **{"acc@1": 0.6 + seed / 100}))
    return folder


def _raw(folder: Path, name: str, text: str) -> None:
    (folder / name).mkdir(parents=True)
    (folder / name / records.RECORD).write_text(text)


def test_wrong_records_are_skipped_with_their_reason_and_never_remove_a_metric(tmp_path: Path) -> None:
    _good(tmp_path)
    _raw(tmp_path, "alone", '{"status": "completed"}')
    _raw(tmp_path, "list", "[1, 2]")
    _raw(tmp_path, "deep", '{"status": "completed", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    write(tmp_path, {**make_record("max", 0), "acc@1": "high"})
    write(tmp_path, {**make_record("max", 1, **{"acc@1": 0.7}), "seed": "one"})
    write(tmp_path, {**make_record("max", 2, **{"acc@1": 0.7}), "nested": {"a": {"b": 1}}})
    built = report.build(tmp_path, baseline="avg")
    assert built.metrics == ["acc@1"] and len(built.runs) == 6 and "max" not in set(built.runs["pooling"])
    reasons = "\n".join(built.skipped)
    assert len(built.skipped) == 6, reasons
    assert "alone" in reasons and "missing run_id" in reasons
    assert "not a poolbench run record" in reasons  # the list
    assert "deep/result.json: too deeply nested" in reasons
    assert "acc@1 is 'high', not a number" in reasons
    assert "seed is 'one', not an int" in reasons
    assert "nested is nested" in reasons


def test_unreadable_record_is_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _good(tmp_path)
    _raw(tmp_path, "locked", '{"status": "completed"}')
    original = os.open

    def os_open(path: object, *args: object, **kwargs: object) -> int:  # records open every file with os.open
        if Path(str(path)).parent.name == "locked":
            raise PermissionError(13, "Permission denied")
        return original(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", os_open)
    built = report.build(tmp_path)
    assert any("locked" in line and "cannot read (Permission denied)" in line for line in built.skipped)


def test_markup_and_undecodable_text_in_records_is_printed_literally(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    results = tmp_path / "runs"
    for seed in range(2):
        write(results, make_record("avg", seed, dataset="[bold]x[/x]", **{"acc@1": 0.5}))
        write(results, make_record("gem", seed, dataset="[bold]x[/x]", **{"acc@1": 0.6}))
        write(results, make_record("gem", seed, dataset="bad\udcff", **{"acc@1": 0.6}))
        write(results, make_record("avg", seed, dataset="bad\udcff", **{"acc@1": 0.6}))
    code = run_cli("report", str(results), "-b", "avg", "--out", str(tmp_path / "out"), "--no-plots")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "[bold]x[/x]" in captured.out and "[[bold]x[/x]] gem vs avg" in captured.out
    assert "bad\\xff" in captured.out  # shown escaped, not a UnicodeEncodeError


def test_several_contexts_keep_their_label_on_every_line(tmp_path: Path) -> None:
    for dataset in ("synthwriters", "digits"):
        _good(tmp_path / dataset)
    for path in (tmp_path / "digits").rglob(records.RECORD):
        record = json.loads(path.read_text())
        records.atomic_write_json(path, {**record, "choice.dataset": "digits", "run_id": record["run_id"] + "-d"})
    built = report.build(tmp_path, baseline="avg")
    assert [line.split("]")[0] for line in built.comparison_lines] == ["[digits", "[synthwriters"]


def test_out_holds_only_this_report_and_states_what_produced_it(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, out = _good(tmp_path / "runs"), tmp_path / "out"
    assert run_cli("report", str(results), "-b", "avg", "--out", str(out), "--format", "csv") == 0
    assert (out / "comparison.csv").is_file()
    assert run_cli("report", str(results), "--where", "pooling=gem", "--out", str(out), "--format", "csv") == 0
    names = sorted(p.name for p in out.iterdir())
    assert "comparison.csv" not in names and "summary.csv" in names and "report.json" in names
    manifest = json.loads((out / "report.json").read_text())
    assert manifest["filters"] == ["pooling=gem"] and manifest["metrics"] == ["acc@1"]
    assert sorted(manifest["files"] + ["report.json", report.output.OWNED]) == names
    head = (out / "summary.csv").read_text().splitlines()[:3]
    assert head[1] == "# filters: --where pooling=gem" and head[2] == "# metrics: acc@1"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


@pytest.mark.parametrize("case", ["file", "foreign", "readonly"])
def test_bad_destinations_are_one_line_and_write_nothing(
    run_cli: Callable[..., int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    results = _good(tmp_path / "runs")
    out = tmp_path / "out"
    if case == "file":
        out.write_text("not a folder")
    elif case == "foreign":
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    else:
        os.chmod(tmp_path, 0o555)
        if os.access(tmp_path, os.W_OK):  # root writes anyway: make the file system say no instead

            def read_only(*args: object, **kwargs: object) -> str:
                raise OSError(30, "Read-only file system")

            monkeypatch.setattr("poolbench.report.output.tempfile.mkdtemp", read_only)
    try:
        code = run_cli("report", str(results), "--out", str(out))
    finally:
        os.chmod(tmp_path, 0o755)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    if case == "foreign":
        assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert not (tmp_path / "runs.csv").exists() and not list(tmp_path.glob(".out*"))


def test_a_failing_writer_leaves_the_previous_report(tmp_path: Path) -> None:
    built = report.build(_good(tmp_path / "runs"))
    out = tmp_path / "out"
    report.write_report(built, out, [lambda r, d: report.write_tables(r, d, ["csv"])])
    before = (out / "runs.csv").read_text()

    def broken(r: report.Report, d: Path) -> list[Path]:
        (d / "runs.csv").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(PoolbenchError, match="No space left on device"):
        report.write_report(built, out, [broken])
    assert (out / "runs.csv").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "runs"]  # the staging folder is gone


def test_unknown_metric_names_the_existing_ones(tmp_path: Path) -> None:
    _good(tmp_path)
    with pytest.raises(PoolbenchError, match=r"unknown metric 'acc@2'. Did you mean 'acc@1'\?.*Valid choices: acc@1"):
        report.build(tmp_path, metrics=["acc@2"])


def _with_curves(folder: Path) -> Path:
    for pooling in ("avg", "dgmp", "gem"):
        for seed in range(2):
            record = make_record(pooling, seed, **{"acc@1": 0.5 + seed / 10, "latency.infer_image_ms": 1.0})
            write(folder, record)
            rows = []
            for epoch in (1, 2, 3):
                row: dict[str, float] = {"epoch": epoch, "loss": 2.0 / epoch + seed, "lr": 1e-3 / epoch}
                if pooling == "dgmp":
                    row["learned.lam"] = 1000.0 - 50 * epoch
                if epoch == 3:
                    row["eval.acc@1"] = 0.5
                rows.append(json.dumps(row))
            (folder / record["run_id"] / "metrics.jsonl").write_text("\n".join(rows) + "\nnot json\n[1]\n")
    return folder


def test_curves_read_every_per_epoch_quantity(tmp_path: Path) -> None:
    from poolbench.report import plots

    built = report.build(_with_curves(tmp_path / "runs"))
    curves = plots.read_curves(built)
    assert len(curves) == 18  # the two malformed lines of each file are skipped
    assert plots.curve_quantities(curves) == ["loss", "lr", "learned.lam", "eval.acc@1"]
    lam = curves[curves["_operator"] == "dgmp"].groupby("epoch")["learned.lam"].mean()
    assert list(lam) == [950.0, 900.0, 850.0]
    written = plots.plot_curves(built, tmp_path / "out")
    assert [p.name for p in written] == ["curves.png", "curves.pdf"]


def test_labels_colours_and_panels(tmp_path: Path) -> None:
    from poolbench.report import plots

    assert plots.metric_label("latency.infer_image_ms") == "inference latency (ms / image)"
    assert plots.metric_label("mAP") == "mAP" and plots.metric_label("eval.mAP") == "held-out mAP"
    built = report.build(_with_curves(tmp_path / "runs"), metrics=["acc@1", "latency.infer_image_ms"])
    colours = plots.colours(built)
    assert list(colours) == ["avg", "dgmp", "gem"] and len(set(colours.values())) == 3
    panels, omitted = plots.mean_panels(built)
    # acc@1 is identical across operators (differs only by seed): no panel; latency is 1.0 everywhere: no panel
    assert panels == [] and len(omitted) == 2
    assert not plots.varies([41.098, 41.13], [0.0, 0.0])  # 0.03 MB of 41 MB is not a difference
    assert plots.varies([0.25, 0.30], [0.01, 0.01])


def test_side_by_side_latency_replaces_per_run_figures(tmp_path: Path) -> None:
    results = _good(tmp_path)
    ids = {p: sorted(r for r in os.listdir(results) if r.startswith(p)) for p in ("avg", "gem")}
    rows = [
        {"run_ids": ids["avg"], "pooling": "avg", "infer_image_ms": 1.0, "infer_image_ms_ci": [0.9, 1.1]},
        {
            "run_ids": ids["gem"],
            "pooling": "gem",
            "infer_image_ms": 2.0,
            "infer_image_ms_ci": [1.8, 2.2],
            "ratio_infer": 2.0,
            "ratio_infer_ci": [1.9, 2.1],
        },
    ]
    side = {"schema": 1, "created": "2026-12-02T08:00:00+00:00", "env": {}, "baseline": "avg", "rows": rows}
    (results / "side_by_side.json").write_text(json.dumps(side))
    built = report.build(results, metrics=["acc@1", "latency.infer_image_ms"], baseline="avg")
    assert "side_by_side.json" in built.latency_source["latency.infer_image_ms"]
    cells = report.display_summary(built).set_index("pooling")["latency.infer_image_ms"]
    assert cells["gem"] == "2.000 [1.800, 2.200]"
    assert set(built.comparison["metric"]) == {"acc@1"}  # one measurement per config: not tested over seeds
    assert built.side_by_side == ["gem vs avg: inference latency × 2 [1.9, 2.1] (side by side)"]
    for seed in range(3):  # runs the file does not cover keep their own figures, and say so
        write(results, make_record("max", seed, **{"acc@1": 0.6, "latency.infer_image_ms": 1.5}))
    mixed = report.build(results, metrics=["latency.infer_image_ms"], baseline="avg")
    assert "for 6 of 9 runs; the others per run" in mixed.latency_source["latency.infer_image_ms"]
    assert mixed.summary.set_index("choice.pooling").loc["max", "latency.infer_image_ms.mean"] == 1.5
    (results / "side_by_side.json").write_text("{broken")
    rebuilt = report.build(results, metrics=["acc@1"])
    assert any("side_by_side.json ignored" in w for w in rebuilt.warnings)


def test_parquet_keeps_the_provenance(tmp_path: Path) -> None:
    if "parquet" not in report.available_formats():
        pytest.skip("pyarrow is not installed")
    built = report.build(_good(tmp_path / "runs"))
    report.write_tables(built, tmp_path / "out", ["parquet"])
    assert "filters: none" in pd.read_parquet(tmp_path / "out" / "runs.parquet").attrs["poolbench_report"]


def test_markup_in_a_bad_value_is_one_literal_error_line(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _good(tmp_path / "runs")
    assert run_cli("report", str(results), "-b", "[/x][bold]", "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown baseline pooling '[/x][bold]'") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_results_folder_whose_name_is_not_utf8(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _with_curves(Path(os.fsdecode(bytes(tmp_path) + b"/runs\xff")))
    assert run_cli("report", str(results), "-b", "avg", "--html") == 0, capsys.readouterr().err
    out = tmp_path / "report"  # the default: <results_dir>/../report
    assert (out / "curves.png").is_file()  # metrics.jsonl found in the undecodable folder
    assert "runs\\xff" in pd.read_csv(out / "runs.csv", comment="#")["run_dir"].iloc[0]


def test_copied_run_folders_bools_and_huge_numbers_are_skipped_not_counted(tmp_path: Path) -> None:
    import shutil

    _good(tmp_path)
    first = sorted(tmp_path.iterdir())[0]
    shutil.copytree(first, tmp_path / "copy")
    write(tmp_path, {**make_record("max", 0), "acc@1": True})
    write(tmp_path, {**make_record("max", 1), "acc@1": 10**400})
    built = report.build(tmp_path)
    assert len(built.runs) == 6 and built.metrics == ["acc@1"]
    reasons = "\n".join(built.skipped)
    assert "same run_id as" in reasons and "acc@1 is true, not a number" in reasons and "acc@1 is 1000" in reasons


def test_out_under_a_file_is_refused_before_any_output(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _good(tmp_path / "runs")
    write(results, make_record("avg", 7, **{"acc@1": 0.5, "env.torch": "0.1"}))  # would print a warning first
    (tmp_path / "file").write_text("")
    assert run_cli("report", str(results), "--out", str(tmp_path / "file" / "out")) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"error: cannot write the report to {tmp_path}/file/out: {tmp_path}/file is a file"
    ]
    assert captured.out == ""


def test_pareto_front_keeps_only_undominated_points() -> None:
    from poolbench.report.plots import pareto_front

    points = pd.DataFrame(
        {"ms": [1.0, 1.0, 2.0, 3.0, 2.5, 4.0], "acc": [0.50, 0.40, 0.70, 0.60, 0.80, 0.80]},
        index=["a", "a-slow-twin", "b", "dominated", "c", "c-slower"],
    )
    assert list(pareto_front(points, "ms", "acc").index) == ["a", "b", "c"]
