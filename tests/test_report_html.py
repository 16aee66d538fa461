"""report.html in a real headless browser (Debian's chromium + chromedriver through selenium)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_report import make_record, write
from test_report_output import _with_curves

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _results(tmp_path: Path) -> Path:
    results = _with_curves(tmp_path / "runs")
    for pooling, value in (("avg", 0.7), ("dgmp", 0.75), ("gem", 0.8)):  # a second dataset: ranks
        for seed in range(2):
            extra = {"acc@1": value + seed / 100, "latency.infer_image_ms": 1.0 + value}
            write(results, make_record(pooling, seed, dataset="digits", **extra))
    failed = {**make_record("max", 9), "status": "failed", "error": "<script>alert(1)</script>"}
    write(results, failed)
    return results


def test_html_is_self_contained_and_escaped(run_cli: Callable[..., int], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("report", str(_results(tmp_path)), "-b", "avg", "--html", "--out", str(out)) == 0
    page = (out / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('src="data:image/png;base64,') == 3  # pareto, means, curves (2 contexts: no CD diagram)
    assert "no critical-difference diagram: 2 contexts" in page
    assert "http://" not in page and "https://" not in page
    assert "poolbench sweep dataset=digits model=smallcnn pooling=dgmp" in page  # a command that reproduces runs
    assert "Holm-adjusted value over the" in page and "sign-flip permutation test" in page


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no headless browser (Debian: chromium + chromium-driver)")
def test_html_renders_in_headless_chromium(run_cli: Callable[..., int], tmp_path: Path) -> None:
    selenium = pytest.importorskip("selenium", reason="selenium is not installed")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    out = tmp_path / "out"
    assert run_cli("report", str(_results(tmp_path)), "-b", "avg", "--html", "--out", str(out)) == 0
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,3000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = selenium.webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    try:
        driver.get((out / "report.html").as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert len(sizes) == 3 and all(done and w > 0 and h > 0 for done, w, h in sizes), sizes
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        screenshot = out / "screenshot.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    finally:
        driver.quit()
