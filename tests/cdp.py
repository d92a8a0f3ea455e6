"""A small Chrome DevTools Protocol client for UI tests: Debian's headless Chromium driven over a
websocket (aiohttp, which Ray already brings). No browser download, no Selenium."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")

# Open a menu or pick an item as a user's pointer does (the UI's menus open on pointer events).
POINTER_CLICK = ("for (const t of ['pointerdown','mousedown','pointerup','mouseup','click']) "
                 "el.dispatchEvent(new PointerEvent(t, {bubbles: true, cancelable: true, pointerType: 'mouse', "
                 "button: 0}));")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Browser:
    """`async with Browser() as page:` a headless Chromium page to navigate, read and click."""

    def __init__(self, width: int = 1600, height: int = 1000):
        self.size = (width, height)

    async def __aenter__(self):
        import aiohttp

        port = free_port()
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.process = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}",
                                         f"--remote-debugging-port={port}", f"--window-size={self.size[0]},{self.size[1]}",
                                         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
                url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.time() > deadline:
                    raise
                await asyncio.sleep(0.3)
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)
        self.next_id = 0
        await self.call("Page.enable")
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        await self.session.close()
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if message.get("id") == self.next_id:
                return message.get("result", message)

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def text(self) -> str:
        return await self.js("document.body ? document.body.innerText : ''") or ""

    async def wait_for_text(self, text: str, timeout_s: float = 90) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if text in await self.text():
                return True
            await asyncio.sleep(0.5)
        return False

    async def click_button(self, starts_with: str) -> bool:
        return bool(await self.js(
            f"(() => {{ const el = [...document.querySelectorAll('button')].find(b => b.innerText.trim()"
            f".startsWith({json.dumps(starts_with)})); if (!el) return false; {POINTER_CLICK} return true; }})()"))

    async def click_menu_item(self, label: str) -> bool:
        return bool(await self.js(
            f"(() => {{ const leaf = [...document.querySelectorAll('[role=menu] *, [role=listbox] *')].find(e => "
            f"e.children.length === 0 && e.innerText && e.innerText.trim() === {json.dumps(label)}); if (!leaf) "
            f"return false; const el = leaf.closest('[role^=menuitem],[role=option]') || leaf; {POINTER_CLICK} "
            f"return true; }})()"))

    async def screenshot(self, path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(shot["data"]))
