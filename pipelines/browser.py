"""Open a report in a real browser and say what a reader would see: headless Chromium (the system's, e.g.
Debian's `chromium` package) driven over the DevTools protocol by playwright (`pip install 'pipelines[browser]'`;
no browser download: playwright is pointed at the installed binary).

`check_page(report.html)` loads the page from disk, waits for it to finish loading and returns a PageCheck:
every <img> with its natural size (0 = did not load), console errors and uncaught page errors, and every
request that left the report's own folder (a self-contained report makes none: its images are relative files
or embedded). With `screenshot=PATH` it also writes a PNG of the page (optionally only its top `clip_height`
pixels), reduced to a 256-colour palette so that a screenshot of text and charts stays small.

`pipelines report RECIPE --screenshot PNG` and tests/test_report_browser.py use it.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.errors import PipelinesError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """$PIPELINES_CHROMIUM, else the first Chromium on PATH (Debian's package installs /usr/bin/chromium)."""
    env = os.environ.get("PIPELINES_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


@dataclass
class PageCheck:
    url: str
    images: list[dict] = field(default_factory=list)   # {"src", "alt", "width", "height"}: natural size, 0 = broken
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    def problems(self) -> list[str]:
        """What a reader would notice, one line each; empty when the page is fine."""
        out = [f"image did not load: {i['src']}" for i in self.images if not i["width"]]
        out += [f"console error: {m}" for m in self.console_errors]
        out += [f"page error: {m}" for m in self.page_errors]
        out += [f"fetched from outside the report: {u}" for u in self.outside_requests]
        return out


def _inside(url: str, folder: Path) -> bool:
    """A request the page may make: a data: URL or a file under the report's folder."""
    if url.startswith("data:"):
        return True
    if not url.startswith("file://"):
        return False
    from urllib.parse import unquote, urlparse

    path = Path(unquote(urlparse(url).path)).resolve()
    return path == folder or folder in path.parents


def _small_png(png: bytes, path: Path, clip_height: int | None) -> None:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    if clip_height and img.height > clip_height:
        img = img.crop((0, 0, img.width, clip_height))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _launch(p, chromium: str, timeout_s: float, tries: int = 3):
    """Start headless Chromium, trying again when a start times out: on a loaded box (CI runs two test files
    at once on two cores) a start has been seen to hang past 30 s once and take under a second the next time."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(1, tries + 1):
        try:
            return p.chromium.launch(executable_path=chromium, args=["--no-sandbox"], timeout=timeout_s * 1000)
        except PlaywrightTimeout as e:
            if attempt == tries:
                raise PipelinesError(f"{chromium} did not start in {timeout_s:g} s, {tries} times: "
                                     f"{str(e).splitlines()[0]}") from None


def check_page(html: Path, screenshot: Path | None = None, width: int = 1100, clip_height: int | None = None,
               timeout_s: float = 30) -> PageCheck:
    """Load `html` in headless Chromium and report its images, errors and outside requests (see module doc)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise PipelinesError("checking a report in a browser needs playwright: pip install 'pipelines[browser]'") from None
    chromium = find_chromium()
    if chromium is None:
        raise PipelinesError("no Chromium found (looked for $PIPELINES_CHROMIUM, then "
                             f"{', '.join(CANDIDATES)} on PATH): install it, e.g. apt-get install chromium")
    html = Path(html).resolve()
    folder = html.parent
    check = PageCheck(url=html.as_uri())
    with sync_playwright() as p:
        browser = _launch(p, chromium, timeout_s)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: m.type == "error" and check.console_errors.append(m.text))
            page.on("pageerror", lambda e: check.page_errors.append(str(e)))
            page.on("request", lambda r: _inside(r.url, folder) or check.outside_requests.append(r.url))
            page.goto(check.url, wait_until="load", timeout=timeout_s * 1000)
            check.images = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.getAttribute('src'), alt: i.alt,"
                " width: i.naturalWidth, height: i.naturalHeight}))")
            if screenshot is not None:
                _small_png(page.screenshot(full_page=True), Path(screenshot), clip_height)
                check.screenshot = Path(screenshot)
        finally:
            browser.close()
    return check
