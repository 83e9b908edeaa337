"""Screenshot the Prefect Custom-run form of zhllama's deployments in a real (headless) browser.

    python docs/ui/screenshots.py            # writes docs/ui/*.png and docs/ui/form-sends.json
    python docs/ui/screenshots.py --keep     # leave the server and browser up (prints their addresses)

What it does, as a user would:

1. starts ``zhllama server --no-worker`` on a free port of 127.0.0.1, with a temporary PREFECT_HOME
   and ZHLLAMA_HOME (so nothing of yours is touched and no build ever runs);
2. starts Debian's Chromium headless (``apt-get install chromium``), with a fresh profile and every
   background fetch off, pointed only at that server, and drives it over the DevTools protocol
   (a websocket on 127.0.0.1; no Playwright, no browser download);
3. for each UI the server serves (V2, the default, under ``/v2``; V1 under ``/``) and for
   ``build-alpaca-plus-7b`` and ``build-tiny-demo``: opens the deployment's page, clicks
   Run -> Custom run, waits for the parameter form and saves a full-height PNG of it;
4. submits each form untouched and records, in ``form-sends.json``, the parameters the browser
   POSTed (what the form sends with every override left empty, read from the DevTools network
   events) and those the server stored for the new flow run: the runs stay Scheduled, no worker
   picks them up. tests/test_flow.py submits the same parameters to a server in CI;
5. opens the overrides of build-alpaca-plus-7b (base model source, one LoRA) and screenshots that.

Needs: the project's virtualenv (prefect, httpx, websockets) and ``chromium`` on PATH. Not part of
CI (CI has no browser); the schema it checks is asserted by tests/test_flow.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import websockets

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEPLOYMENTS = ("build-alpaca-plus-7b", "build-tiny-demo")
WIDTH = 1280
# Chromium without a desktop session: no GPU, no QUIC, no first-run UI, nothing fetched in the background.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                  "--no-default-browser-check", "--metrics-recording-only", "--password-store=basic")

# (UI, how its deployment page is addressed, the texts of the buttons that lead to the form)
UIS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("v2", "/v2/deployments/deployment/{id}", ("Run", "Custom run")),
    ("v1", "/deployments/deployment/{id}", ("Run", "Custom run")),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT the process group (zhllama server stops its Prefect server), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def zhllama_server(tmp: Path, port: int) -> Iterator[str]:
    """``zhllama server --no-worker`` on 127.0.0.1:port; yields its base URL once every deployment exists."""
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "ZHLLAMA_HOME": str(tmp / "zhllama-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("PREFECT_API_URL", None)
    log = tmp / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--no-worker", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "ready after" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"zhllama server did not get ready:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@contextlib.contextmanager
def chromium(tmp: Path) -> Iterator[str]:
    """Headless Chromium with a fresh profile; yields its DevTools websocket URL (browser target)."""
    profile = tmp / "chromium-profile"
    proc = subprocess.Popen(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.is_file() and len(active.read_text().split()) == 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start (is it installed? apt-get install -y chromium)")
            time.sleep(0.2)
        port, path = active.read_text().split()
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        stop(proc, timeout=10)


class DevTools:
    """The smallest DevTools-protocol client: one websocket, commands by id, events queued."""

    def __init__(self, ws: websockets.ClientConnection):
        self.ws, self.next_id, self.events = ws, 0, asyncio.Queue()
        self.pending: dict[int, asyncio.Future] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg and msg["id"] in self.pending:
                self.pending.pop(msg["id"]).set_result(msg)
            else:
                self.events.put_nowait(msg)

    async def send(self, method: str, session: str | None = None, **params: Any) -> dict:
        self.next_id += 1
        fut = self.pending[self.next_id] = asyncio.get_running_loop().create_future()
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}
                                      | ({"sessionId": session} if session else {})))
        msg = await asyncio.wait_for(fut, 60)
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]


class Page:
    def __init__(self, cdp: DevTools, session: str):
        self.cdp, self.session = cdp, session

    async def send(self, method: str, **params: Any) -> dict:
        return await self.cdp.send(method, self.session, **params)

    async def js(self, expression: str) -> Any:
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}…: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def until(self, expression: str, what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        raise TimeoutError(f"timed out waiting for {what}")

    async def click_text(self, text: str, timeout: float = 30) -> None:
        """Click, with the mouse, the visible button, link or menu item whose own text is ``text``.

        A real press and release at the element's centre (not element.click()): the V2 UI's menus
        open on pointer-down."""
        box = await self.until(f"""(() => {{
            const want = {json.dumps(text)};
            const el = [...document.querySelectorAll('button, a, [role=menuitem], [role=button], [role=tab]')]
                .find(e => e.innerText && e.innerText.trim() === want && e.offsetParent !== null);
            if (!el) return null;
            el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect();
            return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
        }})()""", f"a button labelled {text!r}", timeout)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left",
                            buttons=0 if kind == "mouseReleased" else 1, clickCount=1, pointerType="mouse")

    async def posted(self, url_suffix: str) -> list[dict]:
        """The JSON bodies of the POST requests to ``…url_suffix`` this page sent since the last call
        (from the Network events; needs Network.enable)."""
        bodies = []
        while not self.cdp.events.empty():
            msg = self.cdp.events.get_nowait()
            req = msg.get("params", {}).get("request", {})
            if (msg.get("method") == "Network.requestWillBeSent" and msg.get("sessionId") == self.session
                    and req.get("method") == "POST" and req.get("url", "").split("?")[0].endswith(url_suffix)):
                data = req.get("postData")
                if data is None:
                    data = (await self.send("Network.getRequestPostData",
                                            requestId=msg["params"]["requestId"]))["postData"]
                bodies.append(json.loads(data))
        return bodies

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.until("document.readyState === 'complete'", f"{url} to load")

    async def screenshot(self, out: Path) -> None:
        """A PNG of the whole page: the window is made as tall as the tallest scrolling element."""
        height = await self.js("""Math.max(document.documentElement.scrollHeight,
            ...[...document.querySelectorAll('*')].filter(e => e.scrollHeight > e.clientHeight + 4
                && ['auto', 'scroll'].includes(getComputedStyle(e).overflowY)).map(e => e.scrollHeight + 80))""")
        await self.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=min(int(height), 16000),
                        deviceScaleFactor=1, mobile=False)
        await asyncio.sleep(1.0)  # let the layout settle at the new size
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        out.write_bytes(small_png(base64.b64decode(shot["data"])))
        await self.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=900, deviceScaleFactor=1,
                        mobile=False)


def small_png(data: bytes) -> bytes:
    """The screenshot with a 256-colour palette (a third of the size, as legible), when Pillow is there."""
    try:
        from PIL import Image
    except ImportError:
        return data
    import io

    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").quantize(256).save(out, format="PNG", optimize=True)
    return out.getvalue()


async def new_page(cdp: DevTools) -> Page:
    target = (await cdp.send("Target.createTarget", url="about:blank"))["targetId"]
    session = (await cdp.send("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
    page = Page(cdp, session)
    await page.send("Page.enable")
    await page.send("Runtime.enable")
    await page.send("Network.enable")
    await page.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=900, deviceScaleFactor=1, mobile=False)
    return page


def deployment_ids(base: str) -> dict[str, str]:
    r = httpx.post(f"{base}/api/deployments/filter", json={"deployments": {"name": {"any_": list(DEPLOYMENTS)}}},
                   timeout=30)
    r.raise_for_status()
    return {d["name"]: d["id"] for d in r.json()}


def flow_runs(base: str, deployment_id: str) -> dict[str, dict]:
    r = httpx.post(f"{base}/api/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}},
                   timeout=30)
    r.raise_for_status()
    return {f["id"]: f for f in r.json()}


async def shoot(base: str, ws_url: str, out_dir: Path) -> dict[str, Any]:
    ids = deployment_ids(base)
    sends: dict[str, Any] = {}
    async with websockets.connect(ws_url, max_size=64 * 2**20) as ws:
        cdp = DevTools(ws)
        page = await new_page(cdp)
        for ui, path, clicks in UIS:
            for name in DEPLOYMENTS:
                await page.goto(base + path.format(id=ids[name]))
                await page.until(f"document.body.innerText.includes({json.dumps(name)})", f"{ui} page of {name}")
                for text in clicks:  # deployment page -> Run -> Custom run
                    await page.click_text(text)
                await page.until("location.pathname.endsWith('/run') && document.body.innerText.includes('Model')",
                                 f"the {ui} Custom-run form of {name}")
                await asyncio.sleep(2.0)  # the form fills in its defaults after it renders
                form_url = await page.js("location.href")
                shot = out_dir / f"custom-run-{ui}-{name.removeprefix('build-')}.png"
                await page.screenshot(shot)
                print(f"{ui} {name}: {form_url} -> {shot}", flush=True)
                before = set(flow_runs(base, ids[name]))
                await page.posted("/create_flow_run")  # forget what came before
                new: set[str] = set()
                for _attempt in range(3):  # a click while the form still settles can be lost: click again
                    await page.click_text("Submit")
                    deadline = time.monotonic() + 15
                    while not (new := set(flow_runs(base, ids[name])) - before) and time.monotonic() < deadline:
                        await asyncio.sleep(0.5)
                    if new:
                        break
                if not new:
                    text = await page.js("document.body.innerText")
                    raise RuntimeError(f"the {ui} form of {name} created no flow run; the page says:\n{text[:3000]}")
                run = flow_runs(base, ids[name])[new.pop()]
                (body, *_) = await page.posted(f"/deployments/{ids[name]}/create_flow_run") or [{}]
                sends[f"{ui} {name}"] = {"url": form_url.removeprefix(base).replace(ids[name], "{id}"),
                                         "sent": body.get("parameters"), "stored": run["parameters"],
                                         "state": run["state"]["name"] if run.get("state") else None}
                print(f"   submitted untouched: {sends[f'{ui} {name}']['state']}; the form sent "
                      f"{json.dumps(body.get('parameters'))}", flush=True)
            # the same form with overrides opened: a base model source and one LoRA item
            await page.goto(base + sends[f"{ui} {DEPLOYMENTS[0]}"]["url"].replace("{id}", ids[DEPLOYMENTS[0]]))
            await page.until("document.body.innerText.includes('Base model source')", f"the {ui} form again")
            await asyncio.sleep(2.0)
            await page.click_text("Source")  # the first switch: Base model source
            await page.click_text("Add item")  # LoRA sources
            await asyncio.sleep(1.0)
            shot = out_dir / f"custom-run-{ui}-overrides.png"
            await page.screenshot(shot)
            print(f"{ui} {DEPLOYMENTS[0]} with base and one LoRA opened -> {shot}", flush=True)
        cdp.reader.cancel()
    return sends


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="where the PNGs and form-sends.json go (default: docs/ui)")
    ap.add_argument("--keep", action="store_true", help="keep the server and browser up until Ctrl-C")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zhllama-ui-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        t0 = time.monotonic()
        print(f"starting zhllama server --no-worker on 127.0.0.1:{port} (PREFECT_HOME in {tmp}) …", flush=True)
        with zhllama_server(tmp, port) as base:
            print(f"server ready after {time.monotonic() - t0:.0f} s; starting chromium …", flush=True)
            settings = httpx.get(f"{base}/ui-settings", timeout=30).json()
            print(f"UIs served: {settings.get('available_uis')} (default {settings.get('default_ui')})", flush=True)
            with chromium(tmp) as ws_url:
                sends = asyncio.run(shoot(base, ws_url, args.out))
                (args.out / "form-sends.json").write_text(json.dumps(sends, indent=2, sort_keys=True) + "\n",
                                                          encoding="utf-8")
                if args.keep:
                    print(f"server {base}, DevTools {ws_url}; Ctrl-C stops both", flush=True)
                    with contextlib.suppress(KeyboardInterrupt):
                        while True:
                            time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
