"""The HTML report is self-contained and its charts render in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loadtests.html import render_html

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)


def chromium(tmp_path: Path, *args: str) -> str:
    assert CHROMIUM is not None
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


@pytest.fixture
def page(tmp_path: Path, sample_report: dict[str, Any]) -> Path:
    path = tmp_path / "report.html"
    path.write_text(render_html(sample_report))
    return path


def test_page_is_self_contained(page: Path) -> None:
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text
    assert "<script src" not in text


def test_charts_render_in_headless_chromium(tmp_path: Path, page: Path) -> None:
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    charts = re.findall(r'<svg class="chart" data-kind="(\w+)"[^>]*data-rendered="(\d+)"', dom)
    kinds = [k for k, _ in charts]
    # overview + per scenario (product-detail closed, open; callbacks): latency bars,
    # requests/s over time, RSS and CPU per process group over time
    assert kinds.count("bar") == 1 + 3
    assert kinds.count("line") == 3 * 3
    assert all(int(n) > 0 for _, n in charts), charts  # the browser drew every chart's marks
    rendered = re.search(r'data-charts-rendered="(\d+)"', dom)
    assert rendered is not None
    assert int(rendered.group(1)) == len(charts)
    # RSS and CPU charts carry one line per sampled process group
    assert dom.count('data-series="postgres"') == 2 * 3
    assert "product-detail@open: requests/s over time" in dom


def test_screenshot_is_not_blank(tmp_path: Path, page: Path) -> None:
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1200,2000", f"--screenshot={shot}", page.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 50_000  # a white page compresses to a few KB
