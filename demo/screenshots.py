"""Take the README's dashboard screenshot: `serve --demo`, some traffic, the playground run with
the base model, lora-shout and the MAD-X stack, in headless Chromium (Debian's `chromium`).

    .venv/bin/python -m demo.screenshots            # writes docs/dashboard.png
"""

from __future__ import annotations

import sys
import tempfile
import threading

import httpx

from tests.support.browser import CHROMIUM, LAUNCH_ARGS
from tests.support.live import ROOT, ServerProcess

OUT = ROOT / "docs" / "dashboard.png"


def traffic(url: str, stop: threading.Event) -> None:
    """A trickle of completions over the demo adapters, so that the charts have something to draw."""
    names = ["lora-shout", "prefix-snake", "prompt-title", "bottleneck-leet"]
    i = 0
    while not stop.is_set():
        httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"model": names[i % len(names)], "prompt": "The ", "max_tokens": 32, "temperature": 0.8})
        i += 1


def main() -> int:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as store:
        server = ServerProcess("--demo", "--store-dir", store)
        stop = threading.Event()
        threads = [threading.Thread(target=traffic, args=(server.url, stop), daemon=True) for _ in range(3)]
        try:
            for t in threads:
                t.start()
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(f"{server.url}/ui")
                page.locator('#adapter-rows tr[data-name="lora-shout"]').wait_for()
                page.wait_for_timeout(12_000)  # a few polling rounds of traffic for the charts
                page.fill("#pick-1", "lora-shout")
                page.fill("#pick-2", "madx-abjad+madx-snake")
                page.fill("#max-tokens", "150")
                page.click("#run")
                page.wait_for_function("() => !document.querySelector('pre.streaming') && "
                                       "document.getElementById('out-2').textContent.length > 0", timeout=120_000)
                page.wait_for_timeout(2500)
                OUT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(OUT), full_page=True)
                browser.close()
        finally:
            stop.set()
            server.stop()
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
