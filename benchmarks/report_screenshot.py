"""Open an evaluation report in headless Chromium: take a screenshot, check that every image on
the page loaded and that the page is not blank.

    python benchmarks/report_screenshot.py REPORT_DIR [--out shot.png] [--width 1100]
                                           [--height 1400] [--chromium PATH]

Chromium comes from the distribution (Debian: apt-get install chromium). The page is opened from
the disk (file://), as a user would open it. Image loading is read from the page itself: a copy
of index.html with a small script appended (written beside it for the duration of the check,
then removed) records each <img>'s naturalWidth after the load event, and Chromium's
--dump-dom prints it. Exit code 0 when all images loaded and the screenshot is not blank, 1 if
not, 2 when Chromium or the report is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PROBE = """<script>
window.addEventListener("load", () => {
  const found = Array.from(document.images, (im) => [im.getAttribute("src"), im.naturalWidth]);
  document.body.setAttribute("data-probe", JSON.stringify(found));
});
</script>"""


def find_chromium(explicit: str | None = None) -> str | None:
    """Path of a Chromium binary: `explicit`, else the first of CHROMIUM_NAMES on PATH."""
    if explicit:
        return explicit if Path(explicit).is_file() else shutil.which(explicit)
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _run(chromium: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium refuses to start as root with its sandbox (containers, CI);
    # its own profile folder, so that no user profile is read or written.
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                               "--hide-scrollbars", f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def image_load_states(report_dir: Path, chromium: str) -> list[tuple[str, int]]:
    """(src, naturalWidth) of every <img> of report_dir/index.html once loaded (0 = failed)."""
    page = (report_dir / "index.html").read_text(encoding="utf-8")
    # Beside index.html so that the relative image paths resolve; a fresh name, removed after.
    with tempfile.NamedTemporaryFile("w", dir=report_dir, prefix="_probe_", suffix=".html",
                                     delete=False, encoding="utf-8") as f:
        f.write(page.replace("</body>", PROBE + "</body>"))
    probe = Path(f.name)
    try:
        proc = _run(chromium, ["--virtual-time-budget=10000", "--dump-dom",
                               probe.resolve().as_uri()])
    finally:
        probe.unlink()
    found = re.search(r'data-probe="([^"]*)"', proc.stdout)
    if found is None:
        raise RuntimeError(f"Chromium did not report the page's images (exit {proc.returncode}): "
                           f"{proc.stderr[-1000:]}")
    return [(src, int(width)) for src, width in json.loads(found.group(1).replace("&quot;", '"'))]


def screenshot(report_dir: Path, out: Path, chromium: str, width: int = 1100,
               height: int = 1400) -> Path:
    """A PNG of the top `height` pixels of the page at `width` pixels wide."""
    proc = _run(chromium, [f"--window-size={width},{height}", f"--screenshot={out.resolve()}",
                           "--virtual-time-budget=10000",
                           (report_dir / "index.html").resolve().as_uri()])
    if not out.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}): "
                           f"{proc.stderr[-1000:]}")
    return out


def blank_share(png: Path) -> float:
    """Share of the screenshot's pixels that equal its most common colour (1.0 = blank)."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    _, counts = np.unique(pixels, axis=0, return_counts=True)
    return float(counts.max() / len(pixels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report",
                        help="a report folder (tools/eval.py --report DIR, or a run's report/)")
    parser.add_argument("--out", default="report_screenshot.png", help="screenshot PNG")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1400)
    parser.add_argument("--chromium", help="Chromium binary (default: found on PATH)")
    args = parser.parse_args(argv)
    report = Path(args.report)
    chromium = find_chromium(args.chromium)
    if not (report / "index.html").is_file():
        print(f"error: {report}/index.html does not exist; give a report folder", file=sys.stderr)
        return 2
    if chromium is None:
        print("error: no Chromium binary found; install it (Debian: apt-get install chromium) or "
              "pass --chromium PATH", file=sys.stderr)
        return 2
    states = image_load_states(report, chromium)
    failed = [src for src, width in states if width == 0]
    shot = screenshot(report, Path(args.out), chromium, args.width, args.height)
    blank = blank_share(shot)
    print(f"{len(states)} images on the page, {len(states) - len(failed)} loaded"
          + (f"; not loaded: {', '.join(failed)}" if failed else ""))
    print(f"screenshot {shot} ({args.width}x{args.height}): {100 * blank:.1f} % of it is its "
          "commonest colour")
    ok = states and not failed and blank < 0.95
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
