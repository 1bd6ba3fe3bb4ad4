"""Headless Chromium for the report tests: Playwright for Python driving the system's chromium.

``pip install playwright`` brings the library and its driver; no browser is downloaded (never
``playwright install``): :func:`find_chromium` finds the Debian package's binary and Playwright
starts it through ``executable_path``. Nothing is injected into the pages: every check reads
what the browser reports (console messages, uncaught exceptions, requests and failed requests)
or evaluates an expression from outside.

The ``browser`` fixture of ``tests/conftest.py`` gives each test module one :class:`Chromium`
and skips its tests when chromium or playwright is missing; ``tests/benchmarks/bench_explorer.py``
uses :func:`launch` directly.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

try:
    from playwright.sync_api import Error, sync_playwright
except ImportError:  # the tests skip (see missing()); the benchmark says what to install
    sync_playwright = None

    class Error(Exception):
        """Stands in for ``playwright.sync_api.Error``: this module imports without Playwright."""

# Console message types counted as problems: a warning on a static page is a bug of the report
# (a CSP violation, a deprecated API) just as an error is.
PROBLEM_TYPES = ("error", "warning", "assert")
# Software WebGL for the explorer's maps (no GPU here), without SwiftShader's deprecation warning,
# which would otherwise be a console problem on every page with a map.
FLAGS = ["--disable-gpu", "--enable-unsafe-swiftshader"]
# The tab's size in CSS pixels: the explorer tests' size (the report checks share the tab).
VIEWPORT = {"width": 1300, "height": 1000}


def find_chromium():
    """Path of the system's chromium, or ``None``.

    Returns
    -------
    str or None
        ``chromium`` or ``chromium-browser`` from ``PATH`` (``/usr/bin/chromium`` on Debian).
    """
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing():
    """Why a browser cannot be started here, or ``None`` when it can.

    Returns
    -------
    str or None
        A sentence naming what to install: the reason the browser tests skip with.
    """
    if find_chromium() is None:
        return "chromium is not installed (apt-get install chromium; .ci/run installs it when it can)"
    if sync_playwright is None:
        return "playwright is not installed (pip install playwright; the test extra has it)"
    return None


def launch():
    """Start headless chromium under Playwright.

    Returns
    -------
    Chromium
        Close it with :meth:`Chromium.close`.

    Raises
    ------
    RuntimeError
        When :func:`missing` gives a reason.
    """
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    return Chromium(find_chromium())


class Chromium:
    """One headless chromium process and one tab in it, through which every page is opened.

    One tab for every page: a new tab per page doubled the time of the report's checks (a new
    renderer each time, the explorer's scripts compiled afresh). :meth:`Page.restart` keeps what
    one page reports apart from the next. So only one page is open at a time.

    Parameters
    ----------
    executable : str
        The chromium binary (see :func:`find_chromium`).
    """

    def __init__(self, executable):
        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(executable_path=executable, headless=True,
                                                             args=FLAGS)
            self._tab = Page(self._browser.new_page(viewport=VIEWPORT))
        except BaseException:
            self._playwright.stop()
            raise

    def open(self, url, timeout=20):
        """Open ``url`` (a path is made a ``file://`` URL) and wait for its load event.

        Parameters
        ----------
        url : str or path-like
        timeout : float, default=20
            Seconds to wait for the load event.

        Returns
        -------
        Page
            The browser's tab, recording console messages, page errors and requests of this page
            only; valid until the next ``open`` or ``check``.
        """
        if not str(url).startswith(("file:", "http:", "https:", "about:", "data:")):
            url = Path(url).resolve().as_uri()
        self._tab.restart()
        self._tab.goto(url, timeout)
        return self._tab

    def check(self, url, inside):
        """Open ``url`` and list its problems.

        Parameters
        ----------
        url : str
            A ``file://`` URL.
        inside : str
            URL prefix of the folder every request must stay in (``data:`` URLs are allowed too).

        Returns
        -------
        dict
            ``console``: problem messages (console errors and warnings, uncaught exceptions, failed
            requests); ``broken``: ``src`` of images not loaded; ``images`` / ``stylesheets``: how
            many the document has; ``outside``: requested URLs outside ``inside``; ``requests``:
            how many requests the page made.
        """
        page = self.open(url)
        found = page.eval(
            "({broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
            ".map(i => i.getAttribute('src')), count: document.images.length, css: document.styleSheets.length})")
        page.pause(0.1)  # late console messages and requests are counted too
        errors, outside = page.problems(inside)
        return {"console": errors, "broken": found["broken"], "images": found["count"],
                "stylesheets": found["css"], "outside": outside, "requests": len(page.requests)}

    def close(self):
        """Close the browser and stop Playwright's driver (safe to call on a browser already gone)."""
        try:
            self._browser.close()
        except Error:
            pass
        finally:
            self._playwright.stop()


class Page:
    """The tab of a :class:`Chromium`: evaluate, move the mouse and click, and what the browser reported.

    ``messages`` (problems as text) and ``requests`` (URLs) grow as Playwright delivers events,
    which it does during calls into it: :meth:`problems` makes one first, so nothing the page
    did before the call is missed.

    Parameters
    ----------
    page : playwright.sync_api.Page
        A new, not yet navigated tab.
    """

    def __init__(self, page):
        self.raw = page
        self.messages, self.requests = [], []
        self.opened_at = self.load_seconds = None
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.messages.append(f"uncaught {e.name}: {e.message}"))
        page.on("requestfailed", lambda r: self.messages.append(f"{r.failure}: {r.url}"))
        page.on("request", lambda r: self.requests.append(r.url))

    def _console(self, message):
        if message.type in PROBLEM_TYPES:
            self.messages.append(message.text)

    def restart(self):
        """Leave the current document for ``about:blank`` and forget what the tab reported so far.

        Leaving first, then forgetting: requests of the old document that navigating away cancels
        are reported before ``about:blank`` has loaded, so none is counted against the next page.
        """
        self.raw.mouse.move(0, 0)  # no hover left over where the next page draws (a fresh tab has none)
        self.raw.goto("about:blank")
        self.raw.evaluate("0")  # a round trip: the events sent before it are delivered
        self.messages.clear()
        self.requests.clear()

    def goto(self, url, timeout=20):
        """Navigate to ``url`` and wait for the load event; sets ``opened_at`` and ``load_seconds``."""
        self.opened_at = time.perf_counter()
        self.raw.goto(url, wait_until="load", timeout=timeout * 1000)
        self.load_seconds = time.perf_counter() - self.opened_at

    def eval(self, expression):
        """The value of a JavaScript expression in the page (JSON-like; ``undefined`` is ``None``).

        Raises
        ------
        Error
            When the expression throws, or the page navigated away while it ran.
        """
        return self.raw.evaluate(expression)

    def wait_for(self, expression, timeout=20, message="timed out"):
        """Poll ``expression`` every 50 ms until it is truthy.

        Returns
        -------
        float
            Seconds since the navigation started.

        Raises
        ------
        AssertionError
            With ``message``, after ``timeout`` seconds.
        """
        try:
            self.raw.wait_for_function(expression, polling=50, timeout=timeout * 1000)
        except Error as e:
            raise AssertionError(message) from e
        return time.perf_counter() - self.opened_at

    def wait_for_url(self, predicate, timeout=10):
        """Wait until the tab has navigated to a URL for which ``predicate(url)`` is true; returns it.

        Raises
        ------
        AssertionError
            Naming the URL the tab is at, after ``timeout`` seconds.
        """
        try:
            self.raw.wait_for_url(predicate, timeout=timeout * 1000)
        except Error as e:
            raise AssertionError(f"still at {self.raw.url}") from e
        return self.raw.url

    def rect(self, selector, which=0):
        """Bounding client rectangle (``left``, ``top``, ``width``, ``bottom``, ...) of a matched element."""
        return self.eval(f"document.querySelectorAll({json.dumps(selector)})[{which}]"
                         ".getBoundingClientRect().toJSON()")

    def move(self, x, y):
        """Move the mouse to viewport coordinates ``(x, y)`` (hover handlers run)."""
        self.raw.mouse.move(x, y)

    def click(self, x, y):
        """Press and release the left button at ``(x, y)``."""
        self.raw.mouse.click(x, y)

    def pause(self, seconds):
        """Let the page run for ``seconds`` while its events are still delivered (unlike ``time.sleep``)."""
        self.raw.wait_for_timeout(seconds * 1000)

    def screenshot(self, path):
        """Save a PNG of the viewport to ``path`` (to look at a failure); returns ``path``."""
        self.raw.screenshot(path=str(path))
        return path

    def problems(self, inside):
        """``(problem messages, requested URLs outside inside)`` so far; see :meth:`Chromium.check`."""
        self.raw.evaluate("0")  # one round trip: the events sent before it are delivered first
        return (list(self.messages),
                [u for u in self.requests if not (u.startswith(inside) or u.startswith("data:"))])

    def close(self):
        """Done with this page. The tab stays open for the browser's next page, which restarts it."""
