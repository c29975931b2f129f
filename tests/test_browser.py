"""The generated report in a real browser: headless Chromium (Debian's ``chromium`` package),
offline, fresh profile. No console messages at all, every plot div holds an SVG with at least one
trace (plotly ran), a hostile model name shows as text and never as an element, and a screenshot
is kept as a test artifact (``$QBENCH_TEST_ARTIFACTS``, else ``tests/artifacts/``).

Skipped with the reason when no chromium binary is installed: ``bash scripts/bootstrap.sh
--test-tools`` installs it (``apt-get install -y chromium``); under CI the skip fails the run
(tests/conftest.py, EXPECTED_SKIPS).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from qbench.report.build import build_site
from synthetic_records import demo_records

HOSTILE = "<img src=x onerror=alert(1)>"
REPO = Path(__file__).resolve().parents[1]


def _chromium() -> str | None:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome")):
        if cand and Path(cand).exists():
            return cand
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (chromium, chromium-browser or google-chrome): "
                             "`bash scripts/bootstrap.sh --test-tools` installs it (Debian/Ubuntu: "
                             "`apt-get install -y chromium`)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--enable-logging=stderr", "--v=0",
         "--host-resolver-rules=MAP * ~NOTFOUND",    # offline: no name resolves
         "--window-size=1400,2400"]


def artifact_dir() -> Path:
    path = Path(os.environ.get("QBENCH_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_chromium(page: Path, profile: Path, *, screenshot: Path | None = None,
                 timeout: int = 120) -> tuple[str, list[str]]:
    """(DOM after scripts ran, console lines) for ``page`` opened from file://."""
    assert CHROMIUM is not None
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom"]
    if screenshot is not None:
        cmd.append(f"--screenshot={screenshot}")
    proc = subprocess.run([*cmd, page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HOME": str(profile)})
    # chromium logs every console message (log, warn, error, uncaught exception) as CONSOLE
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, console


class _DomCheck(HTMLParser):
    """Collects plot divs (their SVGs and traces), img elements and text."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, bool]] = []   # (tag, opens a plot div)
        self.plots: list[dict[str, int]] = []
        self.imgs: list[dict[str, str | None]] = []
        self.text: list[str] = []

    def _in_plot(self) -> dict[str, int] | None:
        return self.plots[-1] if any(p for _, p in self.stack) else None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        is_plot = tag == "div" and "plotly-graph-div" in classes
        if is_plot:
            self.plots.append({"svg": 0, "traces": 0})
        plot = self._in_plot() if not is_plot else self.plots[-1]
        if plot is not None:
            if tag == "svg" and "main-svg" in classes:
                plot["svg"] += 1
            if tag == "g" and any(c == "trace" or c.startswith("trace") for c in classes):
                plot["traces"] += 1
        if tag == "img":
            self.imgs.append(a)
        if tag not in ("img", "br", "hr", "meta", "link", "input", "path", "rect", "line",
                       "circle", "stop", "use"):
            self.stack.append((tag, is_plot))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    site = tmp_path_factory.mktemp("site")
    recs = (demo_records(model=HOSTILE)
            + demo_records(model="second-1b", n_params=1.2e9, seed=1, with_failures=False))
    build_site(recs, site, budget_gb=0.5, max_loss_pct=1.0)
    page = site / "demo.html"
    shot = artifact_dir() / "report-demo.png"
    shot.unlink(missing_ok=True)
    dom, console = run_chromium(page, tmp_path_factory.mktemp("profile"), screenshot=shot)
    check = _DomCheck()
    check.feed(dom)
    return {"page": page, "dom": dom, "console": console, "check": check, "shot": shot,
            "source": page.read_text(encoding="utf-8")}


def test_no_console_messages(rendered: dict) -> None:
    assert rendered["console"] == [], "\n".join(rendered["console"])


def test_every_chart_rendered_with_data(rendered: dict) -> None:
    plots = rendered["check"].plots
    expected = rendered["source"].count('class="plotly-graph-div"')
    # 8, and each figure-declared value (PPL, KLD, MMLU) against resident memory too
    assert expected == 11 and len(plots) == expected
    for i, p in enumerate(plots):
        assert p["svg"] >= 1, f"plot {i}: plotly drew no svg"
        assert p["traces"] >= 1, f"plot {i}: no trace drawn"


def test_hostile_name_is_text_not_markup(rendered: dict) -> None:
    check = rendered["check"]
    assert check.imgs == []                      # the report has no images at all
    assert HOSTILE in "".join(check.text)        # shown, as text
    body = rendered["dom"].split("<body", 1)[1]
    body = re.sub(r"<script\b.*?</script>", "", body, flags=re.S)
    assert "<img" not in body                    # never markup, not even inside an attribute


def test_screenshot_kept_as_artifact(rendered: dict) -> None:
    shot: Path = rendered["shot"]
    assert shot.is_file() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_index_page_opens_without_console_messages(rendered: dict, tmp_path: Path) -> None:
    dom, console = run_chromium(rendered["page"].parent / "index.html", tmp_path / "profile")
    assert console == [], console
    assert 'href="demo.html"' in dom


def test_console_errors_are_detected(tmp_path: Path) -> None:
    """The harness itself: a page that throws must fail the console check."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><html><body><p>x</p><script>"
                   "throw new Error('deliberate failure')</script></body></html>")
    _, console = run_chromium(bad, tmp_path / "profile")
    assert any("deliberate failure" in line for line in console), console
