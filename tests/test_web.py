"""Front-end extensions (web/js): node's unit tests and the headless Chromium check.

Needs Node.js >= 20 on PATH; the Chromium check also needs Debian's /usr/bin/chromium and
`PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --ignore-scripts` run in the repo root.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS_TESTS = sorted((ROOT / "tests" / "js").glob("*.test.mjs"))
BROWSER_CHECK = ROOT / "tests" / "js" / "browser_check.mjs"
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
NPM_INSTALL = "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --ignore-scripts"


def _node() -> str:
    """Path of node >= 20, or fail saying how to get it."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the web extension tests need Node.js >= 20 (e.g. apt-get install nodejs)", pytrace=False)
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = re.match(r"v(\d+)\.", version)
    if major is None or int(major.group(1)) < 20:
        pytest.fail(f"node {version or '(unknown version)'} is too old: the web extension tests need Node.js >= 20", pytrace=False)
    return node


def _run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
    """Run a command in the repo root; fail with its output unless it exits with 0."""
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(command)} took more than {timeout} s\n{error.stdout or ''}\n{error.stderr or ''}", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}",
            pytrace=False,
        )


def test_js_unit_tests() -> None:
    """Pure logic of both extensions (web/js/lib) under node's test runner."""
    assert JS_TESTS, "no tests/js/*.test.mjs found"
    _run([_node(), "--test", *map(str, JS_TESTS)], timeout=120)


def test_extensions_in_headless_chromium(tmp_path: Path) -> None:
    """Rendering, pixels, mouse drags and the lyrics toolbar in the harness page."""
    node = _node()
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent, so the headless Chromium check cannot run (apt-get install -y chromium)")
    if not (ROOT / "node_modules" / "playwright-core").is_dir():
        pytest.fail(f"node_modules/playwright-core is missing: run `{NPM_INSTALL}` in {ROOT}", pytrace=False)
    env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1", "CHROMIUM_PATH": str(CHROMIUM),
           "ACESTEP_WEB_SCREENSHOTS": str(tmp_path)}
    _run([node, str(BROWSER_CHECK)], timeout=180, env=env)
    for name in ("repaint_region.png", "extend_region.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), f"no screenshot {name}"
