"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), for tests of the pages the service
serves. No selenium, no playwright (which downloads a browser build of its own): the system's
chromium, started with `--remote-debugging-port=0`, and one websocket per page (`websockets`).

    with Browser.launch(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(url)
        page.wait_for("document.querySelector('#result') !== null")
        page.set_files("#file", [path])
        page.screenshot(tmp_path / "shot.png")

`find_chromium()` is None where no binary is installed; tests skip then with `INSTALL_HINT`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import httpx
from websockets.sync.client import ClientConnection, connect

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = (
    f"no chromium binary found (looked for $VQTOK_CHROMIUM, then {', '.join(BINARIES)} on PATH); install it with "
    "`apt-get install -y chromium` (Debian/Ubuntu) or point VQTOK_CHROMIUM at a Chrome/Chromium binary"
)
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str | None:
    """The browser binary: $VQTOK_CHROMIUM if set (an error if it names nothing runnable), else the
    first of BINARIES on PATH; None if there is none."""
    named = os.environ.get("VQTOK_CHROMIUM")
    if named:
        found = shutil.which(named)
        if found is None:
            raise FileNotFoundError(f"VQTOK_CHROMIUM={named!r} is not an executable")
        return found
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


class CDPError(RuntimeError):
    pass


class Page:
    """One browser tab over its own DevTools websocket. Events that arrive while waiting for a
    command's answer are kept in `events` (console messages, exceptions, network requests)."""

    def __init__(self, ws_url: str, target_id: str) -> None:
        self.target_id = target_id
        self._stack = contextlib.ExitStack()  # connect() as a context manager: the form every websockets version takes
        self.ws: ClientConnection = self._stack.enter_context(connect(ws_url, max_size=None, open_timeout=15, ping_interval=None))
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")

    # --- protocol ---

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        msg_id = self._next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = self._receive(deadline, f"the answer to {method}")
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return msg.get("result", {})  # type: ignore[no-any-return]

    def _receive(self, deadline: float, what: str) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {what} in time; {self.diagnostics()}")
        try:
            msg: dict[str, Any] = json.loads(self.ws.recv(timeout=remaining))
        except TimeoutError:
            raise TimeoutError(f"no {what} in time; {self.diagnostics()}") from None
        if "method" in msg:
            self.events.append(msg)
        return msg

    def wait_event(self, method: str, after: int = 0, timeout: float = 30) -> dict[str, Any]:
        """The first event named `method` among events[after:], reading more until it comes."""
        deadline = time.monotonic() + timeout
        seen = after
        while True:
            for event in self.events[seen:]:
                if event["method"] == method:
                    return event
            seen = len(self.events)
            self._receive(deadline, f"{method} event")

    # --- conveniences ---

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        """The JSON value of a JS expression; a thrown exception raises CDPError."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"JS error in {expression[:120]!r}: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, interval: float = 0.05) -> Any:
        """Poll a JS expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still falsy after {timeout} s; {self.diagnostics()}")
            time.sleep(interval)

    def goto(self, url: str, timeout: float = 30) -> None:
        """Navigate and wait for the load event."""
        mark = len(self.events)
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired", after=mark, timeout=timeout)

    def set_files(self, selector: str, paths: Sequence[Path]) -> None:
        """Set the files of an <input type=file> (fires its input and change events)."""
        root = self.send("DOM.getDocument", depth=0)["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        if not node:
            raise CDPError(f"no element matches {selector!r}")
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(Path(p).resolve()) for p in paths])

    def set_value(self, selector: str, value: str) -> None:
        """Set an <input>/<select> value as a user would (input and change events)."""
        self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.value = {json.dumps(value)};"
            " el.dispatchEvent(new Event('input', {bubbles: true})); el.dispatchEvent(new Event('change', {bubbles: true})); })()"
        )

    def click(self, selector: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def mouse_move(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def text(self, selector: str) -> str:
        return str(self.evaluate(f"document.querySelector({json.dumps(selector)}).textContent"))

    def resize(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """A PNG of the viewport, or (full_page) of the whole document."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params |= {
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            }
        data = self.send("Page.captureScreenshot", **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def requested_urls(self, blocked: bool = False) -> list[str]:
        """URLs the page asked for; without `blocked`, less those the browser refused to fetch
        (a Content-Security-Policy, mixed content...: never sent)."""
        refused = {
            e["params"]["requestId"] for e in self.events if e["method"] == "Network.loadingFailed" and e["params"].get("blockedReason")
        }
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent" and (blocked or e["params"]["requestId"] not in refused)
        ]

    def console(self) -> list[str]:
        """Console messages and uncaught exceptions, as text."""
        out = []
        for e in self.events:
            if e["method"] == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"].get("args", []))
                out.append(f"console.{e['params'].get('type')}: {args}")
            elif e["method"] == "Runtime.exceptionThrown":
                d = e["params"]["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif e["method"] == "Log.entryAdded":
                entry = e["params"]["entry"]
                out.append(f"log.{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}".rstrip())
        return out

    def diagnostics(self) -> str:
        return "browser console: " + (" | ".join(self.console()[-10:]) or "(empty)")

    def close(self) -> None:
        self._stack.close()


class Browser:
    """A headless chromium process with remote debugging on a free port; `new_page()` opens tabs."""

    def __init__(self, process: subprocess.Popen[bytes], ws_url: str, log_path: Path) -> None:
        self.process, self.ws_url, self.log_path = process, ws_url, log_path
        self.http = "http://" + ws_url.removeprefix("ws://").split("/", 1)[0]
        self.pages: list[Page] = []

    @classmethod
    def launch(cls, profile: Path, binary: str | None = None, timeout: float = 60) -> Self:
        """Start chromium with a fresh profile folder; its stderr goes to profile/../chromium.log,
        where the DevTools websocket URL is read from ("DevTools listening on ws://...")."""
        binary = binary or find_chromium()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        profile.mkdir(parents=True, exist_ok=True)
        log_path = profile.parent / f"{profile.name}-chromium.log"
        args = [
            binary,
            "--headless=new",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--no-sandbox",  # CI runs as root, where chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            "--force-color-profile=srgb",  # canvas pixels as decoded, no display colour conversion
            "--window-size=1280,900",
            "about:blank",
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _LISTENING.search(log_path.read_text(errors="replace"))
            if found:
                return cls(process, found.group(1), log_path)
            if process.poll() is not None:
                break
            time.sleep(0.05)
        process.kill()
        process.wait(timeout=10)
        raise RuntimeError(
            f"chromium did not open its DevTools port (exit {process.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}"
        )

    def new_page(self) -> Page:
        target = httpx.put(f"{self.http}/json/new?about:blank", timeout=15).raise_for_status().json()
        page = Page(target["webSocketDebuggerUrl"], target["id"])
        self.pages.append(page)
        return page

    def close_page(self, page: Page) -> None:
        page.close()
        self.pages.remove(page)
        httpx.get(f"{self.http}/json/close/{page.target_id}", timeout=15)

    def close(self) -> None:
        for page in list(self.pages):
            with contextlib.suppress(Exception):  # the browser may be gone already
                page.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
