"""Browser check of the built book: headless Debian ``chromium`` opens every page of ``_build/html``.

Usage: ``python book/check_book.py _build/html [--screenshots _build/screenshots]`` (``make book-check``).

The HTML is served on 127.0.0.1 by a thread of this process; chromium runs headless with a fresh
profile, every host except 127.0.0.1 resolving to nothing, and is driven through the DevTools
protocol over a small stdlib websocket client. Per page it asserts:

* the page and every resource it loads answer 2xx/3xx, and no JavaScript exception is thrown;
* no request leaves the machine (every ``Network.requestWillBeSent`` URL is 127.0.0.1, data: or blob:);
* no Python traceback or error output is shown;
* notebook chapters (``notebooks/*.md``) show figures: at least one ``img``/``svg`` of 100x100 px or
  more in cell outputs (icons of buttons do not count);
* chapters that use ipywidgets have their widgets rendered in the DOM by the vendored widget manager;
* every math node is typeset by MathJax (contains an ``mjx-container``);
* the static explorers work without a kernel (``bgem3_lib.analysis.static_widgets``): on a weight explorer
  the sliders are moved to every weighting the build checked in Python (each slider to at least two new
  values), the metric buttons pressed, and the numbers the page draws must equal the build's to 1e-6 and
  differ from the first drawing; on a figure switcher every button combination must show its own image.
  Screenshots before and after the first move must differ.

Screenshots (1280x900 viewport: the top of each page, and the first figure and first widget of
notebook pages; each explorer before and after a move) go to ``--screenshots``. Each page's load time
(navigation to MathJax and widgets done) is printed. Exit status 1 lists every failed assertion.
"""
from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-default-apps", "--disable-extensions", "--mute-audio",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
LOCAL_SCHEMES = {"data", "blob", "about", "chrome", "devtools"}

# Evaluated in the page once it has loaded: what the assertions need, as one JSON object.
PAGE_PROBE = r"""(() => {
  const q = (s) => document.querySelectorAll(s).length;
  const outputs = document.querySelectorAll('.cell_output');
  // figures: images / inline SVG drawn by cells, not the copy-button and toggle icons
  let figures = 0;
  outputs.forEach(o => o.querySelectorAll('img, svg').forEach(el => {
    const r = el.getBoundingClientRect();
    if (!el.closest('button') && r.width >= 100 && r.height >= 100) {
      el.setAttribute('data-check-figure', '');
      figures += 1;
    }
  }));
  const mathNodes = [...document.querySelectorAll('.math')];
  const tracebacks = [...outputs]
      .filter(e => /Traceback \(most recent call last\)|^\s*\w*Error: /m.test(e.textContent)).length;
  return JSON.stringify({
    title: document.title,
    figures: figures,
    cellOutputs: outputs.length,
    mathNodes: mathNodes.length,
    mathTypeset: mathNodes.filter(e => e.querySelector('mjx-container')).length,
    mjx: q('mjx-container'),
    widgetViews: q('script[type="application/vnd.jupyter.widget-view+json"]'),
    widgetState: q('script[type="application/vnd.jupyter.widget-state+json"]'),
    widgetsRendered: q('.jupyter-widgets:not(.widget-error)'),
    widgetErrors: q('.widget-error, .jupyter-widgets-error'),
    errorOutputs: q('.output.error, .output.traceback, .output.stderr'),
    tracebacks: tracebacks,
    height: document.documentElement.scrollHeight,
  });
})()"""

# True once MathJax and the widget manager have finished (or have nothing to do).
READY_PROBE = r"""(() => {
  const math = [...document.querySelectorAll('.math')];
  const mathDone = math.every(e => e.querySelector('mjx-container'));
  const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
  const widgets = document.querySelectorAll('.jupyter-widgets').length;
  return mathDone && widgets >= views && document.readyState === 'complete';
})()"""


# ----------------------------------------------------------------------------- websocket client

class WebSocket:
    """Minimal RFC 6455 client: text frames out (masked), text/continuation frames in."""

    def __init__(self, url: str, timeout: float = 60.0):
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"websocket handshake refused: {status!r}")
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("websocket closed by the browser")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        header = bytes([0x81])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode in (0x9, 0xA):   # ping/pong: chromium does not ping clients; ignore
                continue
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts).decode()

    def close(self) -> None:
        self.sock.close()


class DevTools:
    """Commands and events over the browser websocket, with flattened per-page sessions."""

    def __init__(self, ws_url: str):
        self.ws = WebSocket(ws_url)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, session: str | None = None, timeout: float = 60.0, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)
        raise TimeoutError(f"{method}: no reply in {timeout} s")

    def evaluate(self, session: str, expression: str):
        res = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")


# ----------------------------------------------------------------------------- server and browser

def serve(html_dir: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(QuietHandler, directory=str(html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("chromium not found: apt-get install -y chromium (make book-check does this)")


def start_browser(profile: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.is_file() and len(port_file.read_text().splitlines()) >= 2:
            port, path = port_file.read_text().splitlines()[:2]
            return proc, f"ws://127.0.0.1:{port}{path}"
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with status {proc.returncode} before opening DevTools")
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("chromium did not open its DevTools port within 60 s")


# ----------------------------------------------------------------------------- expectations

def expectations(html_dir: Path, source_dir: Path = ROOT) -> dict[str, dict]:
    """Per page (path relative to the HTML root): is it a notebook chapter, does it use widgets."""
    pages = {}
    for html in sorted(html_dir.rglob("*.html")):
        rel = html.relative_to(html_dir).as_posix()
        if rel.startswith(("_static/", "_sources/", "_images/")):
            continue
        src = source_dir / Path(rel).with_suffix(".md")
        text = src.read_text(encoding="utf-8") if src.is_file() else ""
        notebook = rel.startswith("notebooks/") and "{code-cell}" in text
        static = "BGEM3_BOOK_BUILD" in text            # the chapter shows static explorers in the book
        pages[rel] = {"notebook": notebook, "widgets": notebook and "ipywidgets" in text and not static,
                      "explorers": text.count("weight_explorer_html(") + text.count("image_switcher_html(")}
    return pages


def is_local(url: str) -> bool:
    u = urlparse(url)
    return u.scheme in LOCAL_SCHEMES or (u.scheme in ("http", "https", "ws") and u.hostname == "127.0.0.1")


def check_page(dt: DevTools, base: str, rel: str, expect: dict, shots: Path | None) -> tuple[dict, list[str]]:
    target = dt.call("Target.createTarget", url="about:blank")["targetId"]
    session = dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Page", "Network", "Runtime", "Log"):
        dt.call(f"{domain}.enable", session)
    dt.call("Emulation.setDeviceMetricsOverride", session, width=1280, height=900, deviceScaleFactor=1,
            mobile=False)
    dt.events.clear()
    url = f"{base}/{rel}"
    start, load_seconds = time.monotonic(), float("nan")
    dt.call("Page.navigate", session, url=url)
    problems: list[str] = []
    deadline = time.monotonic() + 60
    loaded = False
    while time.monotonic() < deadline:
        if any(e["method"] == "Page.loadEventFired" and e.get("sessionId") == session for e in dt.events):
            loaded = True
            if dt.evaluate(session, READY_PROBE):
                load_seconds = time.monotonic() - start
                break
        time.sleep(0.25)
        dt.call("Runtime.evaluate", session, expression="0")   # pumps pending events
    else:
        problems.append("timed out waiting for load / MathJax / widgets (60 s)")
    time.sleep(0.5)   # let late requests (fonts, lazy MathJax components) show up
    dt.call("Runtime.evaluate", session, expression="0")
    info = json.loads(dt.evaluate(session, PAGE_PROBE)) if loaded else {}
    if info:
        info["load_seconds"] = load_seconds

    for e in (e for e in dt.events if e.get("sessionId") == session):
        p = e.get("params", {})
        about = p.get("request") or p.get("response") or p.get("entry") or {}
        if urlparse(about.get("url", "")).path == "/favicon.ico":
            continue   # chromium asks for /favicon.ico by itself; the book has none
        if e["method"] == "Network.requestWillBeSent" and not is_local(p["request"]["url"]):
            problems.append(f"request leaves the machine: {p['request']['url']}")
        elif e["method"] == "Network.responseReceived" and p["response"]["status"] >= 400:
            problems.append(f"HTTP {p['response']['status']} for {p['response']['url']}")
        elif e["method"] == "Network.loadingFailed" and not p.get("canceled"):
            problems.append(f"load failed ({p.get('errorText')}) for request {p.get('requestId')}")
        elif e["method"] == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            what = d.get("exception", {}).get("description", d.get("text"))
            problems.append(f"JavaScript exception: {what}"[:300])
        elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
            problems.append(f"console error: {p['entry']['text']}"[:300])

    if info:
        if info["tracebacks"] or info["errorOutputs"]:
            problems.append(f"{info['tracebacks']} traceback(s), "
                            f"{info['errorOutputs']} error/stderr output(s)")
        if expect["notebook"] and info["figures"] == 0:
            problems.append("notebook chapter without a figure (no img/svg in its cell outputs)")
        if info["mathTypeset"] < info["mathNodes"]:
            problems.append(f"math not rendered: {info['mathTypeset']}/{info['mathNodes']} nodes typeset")
        if expect["widgets"] and (info["widgetState"] == 0 or info["widgetsRendered"] == 0):
            problems.append(f"widgets missing: state scripts {info['widgetState']}, "
                            f"rendered {info['widgetsRendered']} for {info['widgetViews']} views")
        if info["widgetErrors"]:
            problems.append(f"{info['widgetErrors']} widget(s) failed to render")
    if shots is not None and loaded:
        screenshot_page(dt, session, rel, expect, shots)
    if loaded:
        found, explorer_problems = check_explorers(dt, session, rel, shots)
        info["explorers"] = found
        problems += explorer_problems
        if found < expect.get("explorers", 0):
            problems.append(f"{expect['explorers']} static explorer(s) expected, {found} on the page")
    dt.call("Target.closeTarget", targetId=target)
    return info, problems


# Moves a weight explorer's sliders / presses its metric button, then returns what it draws.
SET_WEIGHTS = r"""((id, w, metric) => {
  const root = document.getElementById(id);
  root.querySelectorAll('input[data-weight]').forEach((s, i) => {
    s.value = String(w[i]); s.dispatchEvent(new Event('input', {bubbles: true})); });
  root.querySelector(`button[data-metric="${metric}"]`).click();
  const svg = root.querySelector('svg.bgem3-chart');
  return JSON.stringify({values: JSON.parse(svg.dataset.values || '[]'),
    sliders: [...root.querySelectorAll('input[data-weight]')].map(s => parseFloat(s.value)),
    title: (svg.querySelector('.bgem3-title') || {}).textContent || ''});
})"""

# Presses one button per control of a figure switcher; returns which image is visible.
SET_OPTIONS = r"""((id, options) => {
  const root = document.getElementById(id);
  JSON.parse(root.dataset.controls).forEach((name, i) =>
    root.querySelector(`.bgem3-buttons[data-control="${name}"] button[data-option="${options[i]}"]`).click());
  const shown = [...root.querySelectorAll('img[data-key]')].filter(img => !img.hidden);
  return JSON.stringify({shown: shown.map(img => JSON.parse(img.dataset.key)),
                         src: shown.map(img => img.src.length + ':' + img.src.slice(-40))});
})"""


# The controls of a figure switcher: [[option, ...] per control].
LIST_OPTIONS = r"""((id) => {
  const root = document.getElementById(id);
  return JSON.stringify(JSON.parse(root.dataset.controls).map(name =>
    [...root.querySelectorAll(`.bgem3-buttons[data-control="${name}"] button`)].map(b => b.dataset.option)));
})"""

# The ids of the page's explorers and whether each is a weight explorer.
LIST_EXPLORERS = r"""(() => JSON.stringify(
  [...document.querySelectorAll('.bgem3-weight-explorer, .bgem3-image-switcher')]
    .map(e => [e.id, e.classList.contains('bgem3-weight-explorer')])))"""


def _js(dt: DevTools, session: str, function: str, *args):
    """Call a JavaScript function source with JSON arguments; its JSON string result, parsed."""
    return json.loads(dt.evaluate(session, f"({function})({', '.join(json.dumps(a) for a in args)})"))


def _shot(dt: DevTools, session: str, element_id: str) -> bytes:
    dt.evaluate(session, f"document.getElementById({json.dumps(element_id)}).scrollIntoView({{block: 'center'}})")
    time.sleep(0.2)
    return base64.b64decode(dt.call("Page.captureScreenshot", session, format="png")["data"])


def _check_weight_explorer(dt: DevTools, session: str, element_id: str) -> tuple[list[str], bytes | None]:
    problems = []
    payload = json.loads(dt.evaluate(session, f"document.getElementById({json.dumps(element_id)})"
                                              ".querySelector('script.bgem3-data').textContent"))
    first = _js(dt, session, SET_WEIGHTS, element_id, payload["initial"], payload["metrics"][0])
    if not payload["checks"]:
        problems.append(f"{element_id}: no weightings checked by the build")
    moved, after = set(), None
    for check in payload["checks"]:
        got = _js(dt, session, SET_WEIGHTS, element_id, check["weights"], check["metric"])
        after = after or _shot(dt, session, element_id)
        moved |= {(i, v) for i, v in enumerate(got["sliders"]) if v != payload["initial"][i]}
        diff = max((abs(a - b) for a, b in zip(got["values"], check["values"])), default=float("inf"))
        if len(got["values"]) != len(check["values"]) or diff > 1e-6:
            problems.append(f"{element_id}: at w={check['weights']} {check['metric']} the page draws "
                            f"{got['values'][:4]}..., the build computed {check['values'][:4]}... "
                            f"(max difference {diff:.3g})")
        if (check["metric"] == payload["metrics"][0] and got["values"] == first["values"]
                and check["weights"] != payload["initial"]):
            problems.append(f"{element_id}: the chart did not change when the weights moved to {check['weights']}")
    for i in range(3):
        if len({v for j, v in moved if j == i}) < 2:
            problems.append(f"{element_id}: slider {i} was not moved to two new values")
    return problems, after


def _check_switcher(dt: DevTools, session: str, element_id: str) -> tuple[list[str], bytes | None]:
    problems = []
    combos = [[]]
    for opts in _js(dt, session, LIST_OPTIONS, element_id):
        combos = [c + [o] for c in combos for o in opts]
    seen, after = set(), None
    for combo in combos:
        got = _js(dt, session, SET_OPTIONS, element_id, combo)
        after = after or _shot(dt, session, element_id)
        if got["shown"] != [combo]:
            problems.append(f"{element_id}: buttons {combo} show {got['shown']}")
        seen.add(tuple(got["src"]))
    if len(seen) != len(combos):
        problems.append(f"{element_id}: {len(combos)} button combinations show {len(seen)} different images")
    return problems, after


def check_explorers(dt: DevTools, session: str, rel: str, shots: Path | None) -> tuple[int, list[str]]:
    """Drive every static explorer of the page (see the module docstring); (explorers found, problems)."""
    problems: list[str] = []
    explorers = _js(dt, session, LIST_EXPLORERS)
    stem = rel.removesuffix(".html").replace("/", "__")
    for element_id, is_weights in explorers:
        before = _shot(dt, session, element_id)
        found, after = (_check_weight_explorer if is_weights else _check_switcher)(dt, session, element_id)
        problems += found
        if after is None or after == before:
            problems.append(f"{element_id}: the screenshot did not change after moving the controls")
        if shots is not None:
            (shots / f"{stem}-{element_id}-before.png").write_bytes(before)
            if after is not None:
                (shots / f"{stem}-{element_id}-after.png").write_bytes(after)
    return len(explorers), problems


def screenshot_page(dt: DevTools, session: str, rel: str, expect: dict, shots: Path) -> None:
    stem = rel.removesuffix(".html").replace("/", "__")
    views = [("", None)]
    if expect["notebook"]:
        views.append(("-figure", "[data-check-figure]"))
        if expect["widgets"]:
            views.append(("-widget", ".jupyter-widgets"))
    for suffix, selector in views:
        if selector is not None:
            js = (f"(() => {{ const el = document.querySelector({json.dumps(selector)}); "
                  "if (!el) return false; el.scrollIntoView({block: 'start'}); "
                  "window.scrollBy(0, -80); return true; })()")
            if not dt.evaluate(session, js):
                continue
            time.sleep(0.3)
        png = dt.call("Page.captureScreenshot", session, format="png")["data"]
        (shots / f"{stem}{suffix}.png").write_bytes(base64.b64decode(png))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html_dir", type=Path)
    ap.add_argument("--screenshots", type=Path, default=None)
    ap.add_argument("--source", type=Path, default=ROOT, help="book source root (default: the repository)")
    args = ap.parse_args(argv)
    html_dir = args.html_dir.resolve()
    if not (html_dir / "index.html").is_file():
        print(f"{html_dir} has no index.html: build the book first (make book-quick or make book)",
              file=sys.stderr)
        return 2
    if args.screenshots:
        shutil.rmtree(args.screenshots, ignore_errors=True)
        args.screenshots.mkdir(parents=True)
    pages = expectations(html_dir, args.source.resolve())
    server, port = serve(html_dir)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="bgem3-chromium-") as profile:
        proc, ws_url = start_browser(Path(profile))
        try:
            dt = DevTools(ws_url)
            for rel, expect in pages.items():
                info, problems = check_page(dt, f"http://127.0.0.1:{port}", rel, expect, args.screenshots)
                summary = (f"figures {info.get('figures', '?')}, math {info.get('mathTypeset', '?')}/"
                           f"{info.get('mathNodes', '?')}, widgets {info.get('widgetsRendered', '?')}, "
                           f"explorers {info.get('explorers', '?')}, "
                           f"{(html_dir / rel).stat().st_size / 1024:.0f} kB, "
                           f"loaded in {info.get('load_seconds', float('nan')):.2f} s")
                print(f"{'FAIL' if problems else 'ok  '} {rel}: {summary}")
                for p in problems:
                    print(f"       - {p}")
                failures += bool(problems)
            dt.ws.close()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            server.shutdown()
    print(f"{len(pages)} pages checked, {failures} with problems"
          + (f"; screenshots in {args.screenshots}" if args.screenshots else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
