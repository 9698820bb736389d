"""Open an HTML file in headless Chromium over the DevTools protocol and report what happened.

Used by the report tests: console errors, uncaught exceptions, network requests that left the
file system, the plotly figures that drew an SVG, and a full-page screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket  # websocket-client

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0"]
# Counts plotly divs and those that drew: a main-svg with a real size, and no plotly error text.
FIGURES_JS = """(() => {
  const divs = [...document.querySelectorAll('div.plotly-graph-div')];
  const drawn = divs.filter(d => { const s = d.querySelector('svg.main-svg');
                                   return s && s.getBoundingClientRect().width > 100
                                            && s.getBoundingClientRect().height > 100; });
  return JSON.stringify({figures: divs.length, drawn: drawn.map(d => d.id),
                         missing: divs.filter(d => !drawn.includes(d)).map(d => d.id),
                         height: document.documentElement.scrollHeight});
})()"""


def chromium_path() -> str | None:
    """The Chromium binary (Debian's `chromium` first), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageReport:
    console_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    figures: int = 0
    drawn: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    screenshot: Path | None = None


class _DevTools:
    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("method") == method for e in self.events):
                return True
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                break
        return any(e.get("method") == method for e in self.events)


def open_in_chromium(html_file: Path, screenshot: Path | None = None, width: int = 1280,
                     timeout: float = 90.0, first_screen: Path | None = None) -> PageReport:
    """Load `html_file`, wait until every plotly div drew (or `timeout`), collect what went wrong.
    screenshot: the whole page; first_screen: its top 1400 px at full resolution."""
    binary = chromium_path()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = _devtools_port(process, timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        tools = _DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page", "Network"):
            tools.call(f"{domain}.enable")
        tools.call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
        tools.call("Page.navigate", url=html_file.resolve().as_uri())
        tools.wait_for("Page.loadEventFired", timeout)
        report = PageReport()
        deadline = time.monotonic() + timeout
        while True:
            state = json.loads(tools.call("Runtime.evaluate", expression=FIGURES_JS)["result"]["value"])
            if (state["figures"] and not state["missing"]) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # let late console messages arrive
        tools.call("Runtime.evaluate", expression="1")
        report.figures, report.drawn, report.missing = state["figures"], state["drawn"], state["missing"]
        if first_screen is not None:
            shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                              clip={"x": 0, "y": 0, "width": width, "height": 1400, "scale": 1})
            first_screen.parent.mkdir(parents=True, exist_ok=True)
            first_screen.write_bytes(base64.b64decode(shot["data"]))
        if screenshot is not None:
            tools.call("Emulation.setDeviceMetricsOverride", width=width, height=min(state["height"], 16000),
                       deviceScaleFactor=1, mobile=False)
            time.sleep(1.0)
            shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            report.screenshot = screenshot
        report.console_errors, report.external_requests = _problems(tools.events)
        tools.ws.close()
        return report
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(process: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if match:
            return int(match.group(1))
    raise RuntimeError("chromium did not start its DevTools endpoint:\n" + "".join(seen[-20:]))


def _problems(events: list[dict]) -> tuple[list[str], list[str]]:
    errors, external = [], []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(params["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if not url.startswith(("file:", "data:", "blob:", "about:")):
                external.append(url)
    return errors, external


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
