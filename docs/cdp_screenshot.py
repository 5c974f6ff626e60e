"""Doc helper (not a test): a screenshot of a web UI after a few clicks, with headless Chromium driven over the
DevTools protocol (the `websockets` package that Prefect installs).

    python docs/cdp_screenshot.py URL OUT.png [--wait TEXT] [--click TEXT ...] [--width 1600] [--height 1400]

It opens URL, waits until the page shows --wait, clicks in order each element whose own text is --click
(`label:TEXT`: the first whose aria-label contains TEXT; one missing from the page is reported and skipped: UIs
change), waits for the page to settle and writes the window as a PNG.
"""

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request

import websockets

CLICK = """(text) => {
  const all = [...document.querySelectorAll('button, [role=button], [role=switch], [role=tab], label, a, span, div')];
  const label = text.startsWith('label:') && text.slice(6).toLowerCase();  // a button known by its aria-label
  const hit = label ? all.find(e => (e.getAttribute('aria-label') || '').toLowerCase().includes(label))
           : all.find(e => e.childElementCount === 0 && e.textContent.trim() === text)
             || all.find(e => e.textContent.trim() === text);
  if (!hit) return false;
  (hit.closest('button, [role=button], [role=switch], [role=tab], label, a') || hit).click();
  return true;
}"""


async def shoot(ws_url: str, url: str, out: str, wait: str | None, clicks: list[str]) -> None:
    async with websockets.connect(ws_url, max_size=2**28) as ws:
        ids = iter(range(1, 10**6))

        async def call(method: str, **params):
            n = next(ids)
            await ws.send(json.dumps({"id": n, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == n:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg["result"]

        async def js(expr: str):
            return (await call("Runtime.evaluate", expression=expr, returnByValue=True))["result"].get("value")

        await call("Page.enable")
        await call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while wait and not await js(f"document.body && document.body.innerText.includes({json.dumps(wait)})"):
            if time.monotonic() > deadline:
                raise SystemExit(f"{url}: the page never showed {wait!r}")
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        for text in clicks:
            if not await js(f"({CLICK})({json.dumps(text)})"):
                print(f"not on the page, skipped: {text!r}")
            await asyncio.sleep(1.5)
        await asyncio.sleep(2)
        png = (await call("Page.captureScreenshot", format="png"))["data"]
    with open(out, "wb") as f:
        f.write(base64.b64decode(png))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--wait")
    p.add_argument("--click", action="append", default=[])
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1400)
    p.add_argument("--port", type=int, default=9233)
    args = p.parse_args()
    profile = tempfile.mkdtemp(prefix="cdp-")
    browser = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--remote-debugging-port={args.port}", "--remote-debugging-address=127.0.0.1",
         f"--window-size={args.width},{args.height}", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/json/list") as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("chromium did not open its DevTools port")
        asyncio.run(shoot(pages[0]["webSocketDebuggerUrl"], args.url, args.out, args.wait, args.click))
    finally:
        browser.terminate()
        browser.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
