"""Headless Chromium driven over the DevTools protocol on a pipe (standard library only).

`chromium --remote-debugging-pipe` reads NUL-framed JSON commands on fd 3 and answers on fd 4: no
TCP port, no websocket package. A `Page` records console errors, uncaught exceptions and failed
loads while a file loads, evaluates JavaScript in it and takes screenshots (whole viewport or one
element). Chromium is Debian's (`apt-get install chromium`; `make chromium` does it as root).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",  # we run as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
]


class BrowserError(RuntimeError):
    """Chromium is missing, crashed, or did not answer in time."""


def chromium_path() -> str | None:
    return os.environ.get("UWE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageLoad:
    """What happened while a page loaded: errors (console.error/assert, exceptions, failed loads)."""

    url: str
    errors: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def _high_fd(fd: int) -> int:
    """Move a pipe end above 100 so the child's dup2 onto 3 and 4 cannot clobber the other end."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)
    os.close(fd)
    return high


class Browser:
    """One Chromium process (fresh profile); `open(path)` loads a page in a new tab."""

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        exe = chromium_path()
        if exe is None:
            raise BrowserError("chromium not found (apt-get install chromium, or `make chromium`)")
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="uwe-chromium-")
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()
        to_child, from_child = _high_fd(to_child), _high_fd(from_child)

        def child_fds() -> None:
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        args = [*FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}"]
        self.proc = subprocess.Popen(
            [exe, *args, "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4),
            preexec_fn=child_fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._write, data) :]

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                return None
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise BrowserError("Chromium closed the DevTools pipe (crashed or exited)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._send(message)
        end = time.monotonic() + 60
        while True:
            reply = self._receive(end - time.monotonic())
            if reply is None:
                raise BrowserError(f"no answer to {method} within 60 s")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float) -> bool:
        if any(e.get("method") == method for e in self.events):
            return True
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            event = self._receive(left)
            if event is None:
                return False
            self.events.append(event)
            if event.get("method") == method:
                return True
        return False

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            event = self._receive(left)
            if event is None:
                return
            self.events.append(event)

    def open(self, path: str | Path, timeout: float = 60.0) -> Page:
        """Load a local file in a new tab and wait for its load event (and a short settle)."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method, session=session)
        metrics = {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics, session)
        self.events.clear()
        url = Path(path).resolve().as_uri()
        navigation = self.call("Page.navigate", {"url": url}, session)
        if navigation.get("errorText"):
            raise BrowserError(f"cannot open {url}: {navigation['errorText']}")
        if not self.wait_for("Page.loadEventFired", timeout):
            raise BrowserError(f"{url} did not finish loading within {timeout:.0f} s")
        self.drain(0.5)
        return Page(self, session, PageLoad(url))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.call("Browser.close")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # renderer and zygote share the session
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for fd in (self._write, self._read):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, session: str, load: PageLoad) -> None:
        self.browser, self.session, self.load = browser, session, load

    def js(self, expression: str) -> Any:
        """Evaluate an expression in the page and return its JSON value."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        result = self.browser.call("Runtime.evaluate", params, self.session)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:60]}: {details.get('exception', {}).get('description')}")
        return result["result"].get("value")

    def screenshot(self, path: str | Path, selector: str | None = None) -> Path:
        """A PNG of the viewport, or of the element matched by `selector` (scrolled into view)."""
        params: dict[str, Any] = {"format": "png"}
        if selector is not None:
            rect = self.js(
                f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                " return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}; })()"
            )
            params.update(clip={**rect, "scale": 1}, captureBeyondViewport=True)
        data = self.browser.call("Page.captureScreenshot", params, self.session)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen since the page was opened."""
        self.browser.drain(0.1)
        errors = []
        for event in self.browser.events:
            if event.get("sessionId") not in (None, self.session):
                continue
            params = event.get("params", {})
            method = event.get("method")
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                errors.append(f"console.{params['type']}: {text}")
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = (details.get("exception") or {}).get("description") or details.get("text", "")
                errors.append(f"uncaught: {text.splitlines()[0] if text else ''}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
        return errors


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: browser.py PAGE.html OUT_PREFIX   (writes OUT_PREFIX-top/-grid/-uncertainty.png)")
    with Browser(1280, 1100) as browser:
        page = browser.open(sys.argv[1])
        page.screenshot(f"{sys.argv[2]}-top.png")
        page.js("window.scrollTo(0, 0)")
        page.screenshot(f"{sys.argv[2]}-grid.png", ".grid")
        page.screenshot(f"{sys.argv[2]}-uncertainty.png", "#uncertainty")
        problems = page.errors()
    print("\n".join(problems) if problems else f"no console errors; screenshots {sys.argv[2]}-*.png")
    sys.exit(1 if problems else 0)
