"""The dashboard and the report, opened in headless Chromium (Debian's /usr/bin/chromium).

Screenshots go to $MICROSEARCH_SCREENSHOTS when set (to look at them), else to the test's tmp dir.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from microsearch.cli import main

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MICROSEARCH_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_shows_the_study_and_its_trials(searched, browser, tmp_path):
    path, study = searched
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "microsearch", "dashboard", str(path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        api = f"http://127.0.0.1:{port}/api/studies"
        for _ in range(150):
            try:
                studies = json.load(urllib.request.urlopen(api, timeout=1))["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.2)
        study_id = next(s["study_id"] for s in studies if s["study_name"] == study.name)
        trials = optuna.load_study(study_name=study.name, storage=study.storage_url).get_trials()
        n_trials, first = len(trials), trials[0]
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/dashboard/")
        page.get_by_text(f"{study_id}. {study.name}", exact=True).wait_for(timeout=20_000)  # the study list
        page.goto(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}/trials")
        page.get_by_text(f"{n_trials} Trials").wait_for(timeout=20_000)
        page.get_by_text("Trial 0", exact=True).first.wait_for()
        # our trial note: its audited score and accuracy, the trial target, the per-layer breakdown
        heading = f"Trial 0: score {first.value:.5f}, validation accuracy {first.user_attrs['val_acc']:.2%}"
        page.get_by_text(heading).wait_for(timeout=20_000)
        assert page.get_by_role("heading", name="Score breakdown").count() == 1
        assert page.get_by_role("cell", name="stem.0", exact=True).count() == 1
        page.screenshot(path=str(_shots(tmp_path) / "dashboard.png"))
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_report_page_renders_its_plot(searched, browser, tmp_path):
    path, study = searched
    out = tmp_path / "report"
    assert main(["report", str(path), "--out", str(out)]) == 0
    completed = [
        t
        for t in optuna.load_study(study_name=study.name, storage=study.storage_url).get_trials()
        if t.state == TrialState.COMPLETE
    ]
    page = browser.new_page(viewport={"width": 1200, "height": 1600})
    page.goto((out / "report.html").as_uri())
    page.locator(".main-svg").first.wait_for(timeout=20_000)
    assert page.locator(".scatterlayer .point").count() >= len(completed)  # one marker per trial at least
    assert page.get_by_role("heading", name="Accuracy vs score").count() == 1
    assert page.get_by_text(f"target {study.target:.0%}", exact=True).count() == 1  # the accuracy line
    best = min((t for t in completed if t.user_attrs["val_acc"] >= study.target), key=lambda t: t.value)
    assert page.get_by_text(f"Best feasible trial: {best.number}, score {best.value:.5f}").count() == 1
    page.screenshot(path=str(_shots(tmp_path) / "report.png"), full_page=True)


def test_figures_and_reports_export_to_png_and_pdf(tmp_path):
    from microsearch.evaluation.plots import export_html, sweep_figure, write_html

    rows = [{"method": "global", "ratio": r, "val_acc": 0.9 - r / 2, "score": 0.1 - r / 20} for r in (0.1, 0.5, 0.9)]
    html = write_html(sweep_figure(rows), tmp_path / "sweep.html")
    png = export_html(html, tmp_path / "sweep.png", width=900, height=400)
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (900, 400)
    pdf = export_html(html, tmp_path / "sweep.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5000
