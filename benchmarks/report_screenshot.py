"""Render a bundle's report.html in headless Chromium and save a PNG of it.

    python benchmarks/report_screenshot.py [BUNDLE_OR_REPORT_HTML] [--out PNG] [--width 1280]
                                           [--height 2400]

Defaults to the harbor-support example's bundle and docs/report-screenshot.png. Needs a
`chromium` binary (Debian: apt-get install chromium). The browser runs with networking,
updates and sync off and a throwaway profile, so a page that tried to fetch anything would
show it as missing content rather than load it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARBOR_BUNDLE = ROOT / "examples" / "harbor-support" / "build" / "harbor-support" / "bundle"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2400,
               browser: str | None = None) -> Path:
    """Write a PNG of `page` at the given window size; returns `out`."""
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError("no chromium found: apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
             page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120)
    if not out.exists():
        raise RuntimeError(f"{browser} exited without writing {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", nargs="?", type=Path, default=HARBOR_BUNDLE,
                        help="a bundle directory or a report.html")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report-screenshot.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    page = args.page / "report.html" if args.page.is_dir() else args.page
    if not page.exists():
        sys.exit(f"{page} does not exist: compile examples/harbor-support/spec.yaml first")
    out = screenshot(page, args.out, args.width, args.height)
    print(f"{out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
