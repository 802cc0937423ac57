"""Headless Chromium (Debian's `chromium`) on a local HTML file: a screenshot, the rendered DOM and
whatever the page wrote to its console. No driver, no DevTools client: the browser's own flags.

    python -m support.chromium runs/demo/report.html docs/report.png   # the README's screenshot
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BINARY = "chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-extensions", "--enable-logging=stderr", "--v=0"]
"""`--no-sandbox`: CI runs as root, where Chromium's sandbox refuses to start. With logging on
stderr, every console message (console.error, an uncaught exception, a resource that failed to
load) appears as a line with `:CONSOLE` in it."""

_CONSOLE = re.compile(r":CONSOLE[:(]")


@dataclass(frozen=True)
class Page:
    dom: str
    """The DOM after the page rendered (`--dump-dom`)."""
    console: list[str]
    """Lines the page wrote to its console, in either run."""


def available() -> bool:
    return shutil.which(BINARY) is not None


def render(html: Path, screenshot: Path, width: int = 1200, height: int = 2400, timeout: float = 120) -> Page:
    """Open `html` twice, once to screenshot it at `width` x `height`, once to dump its DOM."""
    if not html.is_file():
        raise FileNotFoundError(f"{html}: no such HTML file to open; write the report first (dtrain report RUN_DIR)")
    screenshot.unlink(missing_ok=True)  # so that a stale file cannot pass for this run's screenshot
    url = html.resolve().as_uri()
    shot = _run([f"--screenshot={screenshot}", f"--window-size={width},{height}", url], timeout)
    dump = _run(["--dump-dom", url], timeout)
    if not screenshot.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {screenshot}:\n{shot.stderr[-3000:]}")
    return Page(dump.stdout, _console(shot.stderr) + _console(dump.stderr))


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="dtrain-chromium-") as profile:  # no state shared between runs
        return subprocess.run([BINARY, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if _CONSOLE.search(line)]


if __name__ == "__main__":
    page = render(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]}; console: {page.console or 'nothing'}")
