"""The dashboard at /ui in a real headless Chromium (Debian's `chromium`, driven by Playwright),
against `serve --demo` with an inference and an admin key: it loads without console errors
once the key is entered, keeps the key in sessionStorage and out of every URL, uploads a
dropped adapter, streams the playground's three columns, and merges and resets.

Skipped where Chromium or Playwright is missing, except in CI (`CI` set), where that fails:
`make test` installs Chromium (.ci/chromium). `make test-ui` runs only this file.
"""

from __future__ import annotations

import base64

import httpx
import pytest

from server.demo import DEMO_DIR
from tests.support.browser import CHROMIUM, LAUNCH_ARGS, require_browser
from tests.support.served import ADMIN_KEY

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


class Page:
    """A page on the dashboard with everything it logged and every URL it requested."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.console: list[tuple[str, str]] = []
        self.urls: list[str] = []
        self.auth_headers: list[str] = []
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e))))
        self.page.on("request", self._request)
        self.page.goto(f"{url}/ui")

    def _request(self, request) -> None:
        self.urls.append(request.url)
        if "authorization" in request.headers:
            self.auth_headers.append(request.headers["authorization"])

    def errors(self) -> list[tuple[str, str]]:
        return [(kind, text) for kind, text in self.console if kind in ("error", "pageerror")]

    def enter_key(self, key: str) -> None:
        self.page.fill("#key", key)
        self.page.click("#key-form button[type=submit]")

    def row(self, name: str):
        return self.page.locator(f'#adapter-rows tr[data-name="{name}"]')


@pytest.fixture
def dashboard(browser, demo_server):
    """A page that entered the admin key and reloaded (the key survives in sessionStorage)."""
    page = Page(browser, demo_server.url)
    page.enter_key(ADMIN_KEY)
    page.row("lora-shout").wait_for()
    page.console.clear()
    page.page.reload()
    page.row("lora-shout").wait_for()
    yield page
    page.context.close()


def test_page_asks_for_the_key_then_loads_without_console_errors(browser, demo_server):
    page = Page(browser, demo_server.url)
    try:
        page.page.locator("#message", has_text="needs an API key").wait_for()
        # the only error so far: the browser's note on the one 401 that told the page a key is needed
        assert all("401" in text for _, text in page.errors()), page.errors()
        assert page.page.locator("#model", has_text="tiny-llama-embedded").count() == 1  # /health is open

        page.enter_key(ADMIN_KEY)
        page.row("madx-abjad").wait_for()
        assert page.page.evaluate("sessionStorage.getItem('adapter-server-key')") == ADMIN_KEY
        assert page.page.evaluate("localStorage.length") == 0
        page.console.clear()
        page.page.reload()
        page.row("prompt-title").wait_for()
        page.page.wait_for_timeout(2500)  # a polling round after the reload
        assert page.errors() == []
        assert page.page.locator("#adapter-rows tr").count() == 8
        assert page.row("lora-shout").locator("td").nth(1).inner_text() == "lora"
        assert page.row("madx-abjad").locator("td").nth(5).inner_text() == "device"
        assert float(page.page.inner_text("#throughput")) >= 0  # metrics are read and shown
        assert not any(ADMIN_KEY in u for u in page.urls)
        assert page.auth_headers and set(page.auth_headers) == {f"Bearer {ADMIN_KEY}"}
    finally:
        page.context.close()


def test_dropped_adapter_is_uploaded_and_listed(dashboard, demo_server):
    files = [(f.name, base64.b64encode(f.read_bytes()).decode()) for f in sorted((DEMO_DIR / "lora-shout").iterdir())]
    dashboard.page.fill("#upload-name", "dropped-lora")
    dashboard.page.evaluate("""files => {
        const dt = new DataTransfer();
        for (const [name, b64] of files) {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            dt.items.add(new File([bytes], name));
        }
        const zone = document.getElementById('drop');
        zone.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", files)
    try:
        dashboard.row("dropped-lora").wait_for()
        assert dashboard.row("dropped-lora").locator("td").nth(2).inner_text() == "peft"
        assert "uploaded dropped-lora" in dashboard.page.inner_text("#upload-state")
        assert dashboard.page.evaluate("document.getElementById('upload-progress').value") == 1
        assert dashboard.errors() == []
    finally:
        httpx.delete(f"{demo_server.url}/v1/adapters/dropped-lora", headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def test_playground_streams_base_and_two_adapters(dashboard, demo_server):
    page = dashboard.page
    page.fill("#prompt", "Return the")
    page.fill("#max-tokens", "40")
    assert (page.input_value("#temperature"), page.input_value("#seed")) == ("0.6", "1")  # the defaults
    page.fill("#pick-1", "lora-shout")
    page.fill("#pick-2", "madx-abjad+madx-snake")
    page.click("#run")
    page.wait_for_function("""() => !document.querySelector('pre.streaming') &&
                              [0, 1, 2].every(i => document.getElementById('out-' + i).textContent.length > 0)""")
    texts = [page.evaluate(f"document.getElementById('out-{i}').textContent") for i in range(3)]
    chunks = [int(page.get_attribute(f"#out-{i}", "data-chunks")) for i in range(3)]
    assert all(n > 1 for n in chunks), chunks  # each column drew several stream events
    direct = httpx.post(f"{demo_server.url}/v1/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                        json={"model": "tiny-llama-embedded", "prompt": "Return the", "max_tokens": 40, "temperature": 0.6,
                              "seed": 1},
                        timeout=60).json()["choices"][0]["text"]
    assert texts[0] == direct
    letters = [c for c in texts[1] if c.isalpha()]
    assert sum(c.isupper() for c in letters) >= 0.8 * len(letters)
    assert "_" in texts[2] and texts[2] != texts[0]
    assert dashboard.errors() == []


def test_merge_and_reset_buttons_change_the_state(dashboard, demo_server):
    page = dashboard.page
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        dashboard.row("lora-shout").get_by_role("button", name="Merge").click()
        page.locator("#merged-state", has_text="merged: lora-shout").wait_for()
        dashboard.row("lora-shout").locator("td.merged", has_text="yes").wait_for()
        assert httpx.get(f"{demo_server.url}/v1/merge", headers=headers).json() == {"merged": "lora-shout"}

        dashboard.row("prefix-snake").get_by_role("button", name="Merge").click()  # cannot merge: 409, shown
        page.locator("#message.error").wait_for()
        assert "lora-shout" in page.inner_text("#merged-state")

        page.click("#reset")
        page.locator("#merged-state", has_text="merged: none").wait_for()
        assert httpx.get(f"{demo_server.url}/v1/merge", headers=headers).json() == {"merged": None}
        assert all("409" in text for _, text in dashboard.errors())  # the browser's note on the refused merge
    finally:
        httpx.post(f"{demo_server.url}/v1/merge/reset", headers=headers)
