"""Check the built documentation in a real browser (headless Chromium).

Serves the built HTML on 127.0.0.1, opens the index, the API page of ``ZINBWaVE``, a tutorial,
the benchmarks and the model page in headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium), saves a screenshot of each, and asserts that

* each page renders its expected headings (and the API page its parameters and methods);
* every image on it has loaded with a non-zero size, and the tutorial has its figures;
* the formulas were typeset by MathJax (served with the site, no network);
* the browser logged no error (a missing script, stylesheet or image shows up there);
* no internal link is broken: every link of the opened pages answers 200 from the server, and
  every relative link (with its ``#anchor``) of every page of the site points at a file and an
  id that exist.

Usage (after ``sphinx-build -b html docs docs/_build/html``)::

    python docs/browser_check.py [--html docs/_build/html] [--out docs/_build/screenshots]

Needs ``apt-get install chromium chromium-driver`` and ``pip install selenium`` (in the docs
extra). Exits 0 when every check passes, 1 with one line per failure otherwise.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: page -> what it must show: the h1, further headings (h2/h3), at least this many figures
#: (images inside the article), and CSS selectors that must match at least one element
PAGES = {
    "index.html": {
        "h1": "zinbgrad",
        "headings": [],
        "min_figures": 0,
        "selectors": [".sd-card"],
    },
    "api/generated/zinbgrad.ZINBWaVE.html": {
        "h1": "zinbgrad.ZINBWaVE",
        "headings": [],
        "min_figures": 0,
        "selectors": [
            'dt[id="zinbgrad.ZINBWaVE"]',
            'dt[id="zinbgrad.ZINBWaVE.fit"]',
            'dt[id="zinbgrad.ZINBWaVE.transform"]',
            "dl.field-list",
        ],
    },
    "tutorials/1_pbmc_latent_space.html": {
        "h1": "Latent space, UMAP and clusters with scanpy",
        "headings": ["Fit", "Neighbours, UMAP and Leiden clusters", "Marker genes"],
        "min_figures": 4,
        "selectors": ["div.cell_output"],
    },
    "benchmarks.html": {
        "h1": "Benchmarks",
        "headings": [
            "Scaling to 1.3 million cells",
            "Against scVI",
            "Batch integration scored by scib-metrics",
        ],
        # 4 historical comparison figures (flagged by a note), scaling, integration
        "min_figures": 6,
        "selectors": ["table", "div.admonition.note"],
    },
    "user_guide/model.html": {
        "h1": "The model",
        "headings": ["Likelihood", "Penalized objective", "Orthogonal latent factors"],
        "min_figures": 0,
        "selectors": ["mjx-container"],
    },
}

#: with --all-tutorials (the build that executes them all, docs/build.sh)
TUTORIALS = {
    "tutorials/2_batch_correction.html": {
        "h1": "Batch correction",
        "headings": ["Fits without and with the batch", "The planted batch effect, recovered"],
        "min_figures": 4,
        "selectors": ["div.cell_output"],
    },
    "tutorials/3_normalized_values_de.html": {
        "h1": "Normalized values, residuals, imputation and weighted differential expression",
        "headings": ["Normalized values", "Residuals", "Imputation"],
        "min_figures": 4,
        "selectors": ["div.cell_output"],
    },
    "tutorials/4_streaming_cli.html": {
        "h1": "A large file streamed from disk, with the command line",
        "headings": ["Fit from disk", "Reading the results without loading the counts"],
        "min_figures": 1,
        "selectors": ["div.cell_output"],
    },
}

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]
WIDTH, HEIGHT = 1280, 1000  # the browser window


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """Stay quiet when the browser drops a connection (it cancels requests freely)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``root`` on 127.0.0.1 (a free port) in a daemon thread."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class _Links(HTMLParser):
    """The ``href``/``src`` of links, images, scripts and stylesheets, and every ``id``."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a and a["id"]:
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        for key in ("href", "src"):
            if tag in ("a", "link", "img", "script") and a.get(key):
                self.refs.append(a[key])


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    return p


def site_links(root: Path) -> list[str]:
    """Broken relative links of every HTML page of the site (file or ``#anchor`` missing)."""
    failures = []
    # _static holds the theme's template fragments, not pages
    pages = sorted(p for p in root.rglob("*.html") if "_static" not in p.relative_to(root).parts)
    parsed = {p.resolve(): _parse(p) for p in pages}
    for page, links in parsed.items():
        for ref in links.refs:
            url = urllib.parse.urlsplit(ref)
            if url.scheme or url.netloc or ref.startswith(("mailto:", "javascript:", "data:")):
                continue
            target = page if not url.path else (page.parent / urllib.parse.unquote(url.path))
            target = target.resolve()
            if target.is_dir():
                target = target / "index.html"
            rel = page.relative_to(root.resolve())
            if not target.exists():
                failures.append(f"{rel}: link to missing {ref}")
                continue
            frag = urllib.parse.unquote(url.fragment)
            if frag and target.suffix == ".html" and target in parsed:
                if frag not in parsed[target].ids:
                    failures.append(f"{rel}: link to missing anchor {ref}")
    return failures


def make_driver(chromium: str, chromedriver: str, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={WIDTH},{HEIGHT}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)


def _wait(driver, condition: str, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if driver.execute_script(f"return Boolean({condition});"):
            return True
        time.sleep(0.1)
    return False


def screenshots(driver, path: Path) -> None:
    """The first screen (``NAME_top.png``) and the whole page (``NAME.png``, up to 16,000
    pixels high: the window is made as tall as the page, then restored)."""
    driver.save_screenshot(str(path.with_name(path.stem + "_top.png")))
    height = driver.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight);"
    )
    driver.set_window_size(WIDTH, min(int(height) + 100, 16000))
    time.sleep(0.3)
    driver.save_screenshot(str(path))
    driver.set_window_size(WIDTH, HEIGHT)


def check_page(driver, base: str, page: str, spec: dict, out: Path) -> list[str]:
    failures = []
    driver.get(urllib.parse.urljoin(base, page))
    _wait(driver, "document.readyState === 'complete'")
    if "mjx-container" in spec["selectors"]:
        _wait(driver, "document.querySelector('mjx-container')")
    # images below the fold may load lazily: scroll through the page first
    driver.execute_script(
        "document.querySelectorAll('img').forEach(i => {i.loading = 'eager';"
        " i.scrollIntoView();}); window.scrollTo(0, 0);"
    )
    _wait(driver, "Array.from(document.images).every(i => i.complete)")
    name = page.replace("/", "_").replace(".html", "")
    screenshots(driver, out / f"{name}.png")

    h1 = driver.execute_script(
        "const h = document.querySelector('article h1, main h1, h1');"
        "return h ? h.textContent : null;"
    )
    h1 = re.sub(r"[#¶\s]+$", "", (h1 or "").strip()).strip()
    if h1 != spec["h1"]:
        failures.append(f"{page}: h1 is {h1!r}, expected {spec['h1']!r}")
    headings = driver.execute_script(
        "return Array.from(document.querySelectorAll('article h2, article h3'))"
        ".map(h => h.textContent.trim());"
    )
    headings = [re.sub(r"[#¶\s]+$", "", h).strip() for h in headings]
    for want in spec["headings"]:
        if want not in headings:
            failures.append(f"{page}: heading {want!r} missing (has {headings})")
    for sel in spec["selectors"]:
        if not driver.execute_script(f"return document.querySelectorAll({sel!r}).length;"):
            failures.append(f"{page}: nothing matches {sel!r}")

    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete,"
        " i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width,"
        " Boolean(i.closest('article'))]);"
    )
    figures = 0
    for src, complete, nw, nh, shown, in_article in images:
        if not (complete and nw > 0 and nh > 0):
            failures.append(f"{page}: image {src} did not load ({nw}x{nh})")
        elif in_article and shown <= 0:
            failures.append(f"{page}: image {src} is shown with zero width")
        elif in_article:
            figures += 1
    if figures < spec["min_figures"]:
        failures.append(f"{page}: {figures} figures loaded, expected >= {spec['min_figures']}")

    for entry in driver.get_log("browser"):
        msg = entry.get("message", "")
        if entry.get("level") != "SEVERE" or "/favicon.ico " in msg:
            continue  # the site has no favicon: the browser's own request for one may 404
        failures.append(f"{page}: browser error: {msg}")

    hrefs = driver.execute_script(
        "return Array.from(document.querySelectorAll('a[href], link[href], script[src], img[src]'))"
        ".map(e => e.href || e.src);"
    )
    for url in sorted(set(hrefs)):
        if not url.startswith(base):
            continue
        target = urllib.parse.urldefrag(url)[0]
        try:
            with urllib.request.urlopen(target, timeout=10) as resp:
                status = resp.status
        except urllib.error.HTTPError as err:
            status = err.code
        if status != 200:
            failures.append(f"{page}: internal link {url} answers {status}")
    print(f"  {page}: h1 {h1!r}, {len(headings)} h2/h3, {figures} figures, {len(images)} images")
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", default=str(HERE / "_build" / "html"), help="built site")
    ap.add_argument("--out", default=str(HERE / "_build" / "screenshots"), help="screenshots")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument(
        "--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver"
    )
    ap.add_argument(
        "--all-tutorials",
        action="store_true",
        help="also check tutorials 2-4 (when the build executed them: docs/build.sh)",
    )
    args = ap.parse_args(argv)
    pages = {**PAGES, **(TUTORIALS if args.all_tutorials else {})}
    root, out = Path(args.html), Path(args.out)
    if not (root / "index.html").exists():
        print(f"error: no built site in {root} (run sphinx-build first)", file=sys.stderr)
        return 2
    for exe in (args.chromium, args.chromedriver):
        if not Path(exe).exists():
            print(
                f"error: {exe} not found: apt-get install chromium chromium-driver",
                file=sys.stderr,
            )
            return 2
    out.mkdir(parents=True, exist_ok=True)

    failures = site_links(root)
    print(f"site: {len(list(root.rglob('*.html')))} pages, {len(failures)} broken links")
    server, base = serve(root)
    profile = tempfile.mkdtemp(prefix="zinbgrad-docs-chromium-")
    driver = make_driver(args.chromium, args.chromedriver, profile)
    try:
        for page, spec in pages.items():
            failures += check_page(driver, base, page, spec, out)
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"screenshots in {out}")
    for f in failures:
        print("FAIL", f)
    print("browser check:", "passed" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
