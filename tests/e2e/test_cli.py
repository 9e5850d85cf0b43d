"""`adapter-client` through subprocess against a live server: a whole session on a PEFT LoRA
made by PEFT itself, exit codes, and the examples of the README's clients section run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import httpx

from clients import ConnectionFailed, ServerError, TooLarge
from clients.cli import exit_code
from tests.support.live import ROOT, free_port
from tests.support.served import ADMIN_KEY, MAX_UPLOAD, USER_KEY

README = ROOT / "README.md"
HELLO = "Hello"  # the CLI sends text; the byte tokenizer makes it PROMPT's ids


@pytest.fixture
def live(keyed_server):
    """(url, work dir holding ./my-lora, expected base text, expected LoRA text)."""
    return keyed_server


def cli(live, *args: str, key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess:
    url, cwd, _, _ = live
    env = {**os.environ, "ADAPTER_CLIENT_URL": url, "PYTHONPATH": str(ROOT)}
    for name in ("ADAPTER_SERVER_API_KEY", "ADAPTER_CLIENT_API_KEY", "ADAPTER_CLIENT_ADMIN_KEY"):
        env.pop(name, None)
    if key is not None:
        env["ADAPTER_CLIENT_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_full_session_upload_complete_merge_reset_delete(live):
    _, _, expect_base, expect_lora = live
    up = cli(live, "upload", "my-lora", "./my-lora", "--progress")
    # stderr is not a terminal here: no bar, one plain summary line in binary units
    assert re.fullmatch(r"uploaded my-lora: \d+\.\d (KiB|MiB) in \d+\.\d s\n", ok(up) and up.stderr), up.stderr
    assert re.search(r"method:\s+lora", up.stdout) and re.search(r"format:\s+peft", up.stdout)

    table = ok(cli(live, "list")).splitlines()
    assert table[0].split()[:3] == ["NAME", "FORMAT", "METHOD"] and table[1].split()[:3] == ["my-lora", "peft", "lora"]
    listed = json.loads(ok(cli(live, "list", "--json")))
    assert [a["id"] for a in listed] == ["my-lora"] and listed[0]["merged"] is False
    assert json.loads(ok(cli(live, "--json", "show", "my-lora")))["method"] == "lora"

    greedy = ["--max-tokens", "8", "--temperature", "0"]
    assert ok(cli(live, "complete", HELLO, "--model", "my-lora", *greedy)) == expect_lora + "\n"
    assert ok(cli(live, "complete", HELLO, "-a", "my-lora", "--stream", *greedy)) == expect_lora + "\n"
    assert ok(cli(live, "complete", HELLO, *greedy)) == expect_base + "\n"
    chunks = [json.loads(line) for line in ok(cli(live, "complete", HELLO, "--stream", "--json", *greedy)).splitlines()]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expect_base
    full = json.loads(ok(cli(live, "complete", HELLO, "--json", "--logprobs", "1", *greedy)))
    assert full["choices"][0]["text"] == expect_base and len(full["choices"][0]["logprobs"]["tokens"]) == 8

    assert ok(cli(live, "merge", "my-lora")).strip() == "merged: my-lora"
    assert json.loads(ok(cli(live, "merge", "--json"))) == {"merged": "my-lora"}
    assert ok(cli(live, "complete", HELLO, "--model", "my-lora", *greedy)) == expect_lora + "\n"
    assert ok(cli(live, "complete", HELLO, *greedy)) == expect_base + "\n"
    assert ok(cli(live, "reset")).strip() == "merged: none"
    assert ok(cli(live, "complete", HELLO, *greedy)) == expect_base + "\n"

    assert ok(cli(live, "delete", "my-lora")).strip() == "deleted my-lora"
    gone = cli(live, "show", "my-lora")
    assert gone.returncode == 3 and "my-lora" in gone.stderr


def test_exit_codes(live, tmp_path):
    assert cli(live, "upload", "dup", "./my-lora").returncode == 0
    try:
        conflict = cli(live, "upload", "dup", "./my-lora")
        assert conflict.returncode == 4 and "dup" in conflict.stderr
        assert cli(live, "list", key=None).returncode == 5
        assert cli(live, "list", key="wrong").returncode == 5
        assert cli(live, "delete", "dup", key=USER_KEY).returncode == 5
        too_long = cli(live, "complete", "hi", "--max-tokens", "100")
        assert too_long.returncode == 2 and "maximum context length" in too_long.stderr
        assert cli(live, "merge", "ghost").returncode == 3
    finally:
        assert cli(live, "delete", "dup").returncode == 0
    assert cli(live, "upload", "x", str(tmp_path / "missing")).returncode == 2
    assert cli(live, "complete").returncode == 2  # argparse: missing PROMPT
    assert cli(live, "frobnicate").returncode == 2
    assert cli(live, "--url", f"http://127.0.0.1:{free_port()}", "health").returncode == 6
    assert exit_code(ServerError(500, "boom")) == 1 and exit_code(ConnectionFailed(0, "x")) == 6
    assert exit_code(TooLarge(413, "too big")) == 2  # refused by the server, like 400 and 422


def upload_posts(live) -> float:
    """How many upload bodies the server has received (its own metrics)."""
    text = httpx.get(live[0] + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("adapter_server_http_requests_total{") and 'route="/v1/adapters"' in line
               and 'method="POST"' in line)


def test_an_upload_the_server_would_refuse_is_never_sent(live):
    _, cwd, _, _ = live
    big = cwd / "big-lora"
    big.mkdir(exist_ok=True)
    for f in (cwd / "my-lora").iterdir():
        (big / f.name).write_bytes(f.read_bytes())
    (big / "optimizer.bin").write_bytes(b"\0" * (MAX_UPLOAD + (2 << 20)))
    assert cli(live, "upload", "taken", "./my-lora").returncode == 0
    try:
        before = upload_posts(live)
        too_large = cli(live, "upload", "big", "./big-lora")
        assert too_large.returncode == 2 and "max_upload_bytes" in too_large.stderr, too_large.stderr
        taken = cli(live, "upload", "taken", "./my-lora")
        assert taken.returncode == 4 and "taken" in taken.stderr
        assert upload_posts(live) == before  # both refused by the pre-check: no body went out
    finally:
        assert cli(live, "delete", "taken").returncode == 0
    with_env_admin = {**os.environ, "ADAPTER_CLIENT_URL": live[0], "ADAPTER_CLIENT_API_KEY": USER_KEY,
                      "ADAPTER_CLIENT_ADMIN_KEY": ADMIN_KEY, "PYTHONPATH": str(ROOT)}
    with_env_admin.pop("ADAPTER_SERVER_API_KEY", None)
    both = subprocess.run([sys.executable, "-m", "clients.cli", "upload", "two-keys", "./my-lora"], cwd=cwd,
                          env=with_env_admin, capture_output=True, text=True, timeout=120)
    assert both.returncode == 0, both.stderr  # the admin key from the client's own variable
    assert cli(live, "delete", "two-keys").returncode == 0


def render_upload(width: int, name: str, total: int = 2_700_000) -> list[str]:
    """What UploadProgress draws on a terminal `width` columns wide: the frames of its one line."""
    import io

    from rich.console import Console

    from clients.cli import UploadProgress

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=width, color_system=None)
    with UploadProgress(name, console) as progress:
        for sent in range(0, total + 1, total // 20):
            progress(sent, total)
    raw = out.getvalue()
    assert raw.count("\n") == 1  # redraws go back over the same line; one newline at the end
    frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", f) for f in re.split(r"[\r\n]", raw)]
    return [f for f in frames if f.strip()]


@pytest.mark.parametrize("width", [30, 50, 80, 160])
def test_upload_progress_is_one_line_that_fits_the_terminal(width):
    for name in ("my-lora", "a-very-long-adapter-name-" * 4):
        frames = render_upload(width, name)
        assert frames and all(len(f) <= width for f in frames), frames
        assert "100%" in frames[-1]
        if width >= 80:
            assert "2.6/2.6 MiB" in frames[-1]  # 2,700,000 bytes in binary units


def test_health_and_sizes_print_as_tables():
    from clients.cli import health_rows, human_bytes, table
    from clients.client import Health

    health = Health("ok", "tiny", {"running": 1, "adapters": {"adapters": 3, "device_bytes": 3 * 1024 * 1024}})
    lines = table(["FIELD", "VALUE"], health_rows(health)).splitlines()
    assert lines[0].split() == ["FIELD", "VALUE"] and lines[1].split() == ["status", "ok"]
    assert lines[-1].split() == ["adapters:", "device", "bytes", "3.0", "MiB"]
    assert (human_bytes(1023), human_bytes(1536), human_bytes(5 << 30)) == ("1023 B", "1.5 KiB", "5.0 GiB")


def clients_section() -> str:
    """The README's quick-start section for the clients (between its marker comments)."""
    text = README.read_text()
    return text[text.index("<!-- clients:start -->") : text.index("<!-- clients:end -->")]


def doc_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) for the runnable fenced blocks of a Markdown page, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M) if m[1] in ("bash", "python")]


def test_docs_examples_run(demo_server):
    """Every `bash` / `python` block of the README's clients section, in order, from the
    repository root, against `serve --demo` with the documented keys (conftest.demo_server);
    the uploaded LoRA's text is checked against PEFT on the shipped files."""
    from peft import PeftModel

    from demo.train_adapters import base_model, greedy

    section = clients_section()
    blocks = doc_blocks(section)
    assert [lang for lang, _ in blocks] == ["bash", "python", "python"]
    assert "serve --demo --api-key user-secret --admin-key admin-secret" in section
    lora = PeftModel.from_pretrained(base_model(), ROOT / "server" / "demo_adapters" / "lora-shout").eval()
    expect_lora = greedy(lora, "Return the", 24)  # the README's prompt and length
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("ADAPTER_SERVER_URL", "ADAPTER_SERVER_API_KEY", "ADAPTER_CLIENT_URL", "ADAPTER_CLIENT_API_KEY",
                "ADAPTER_CLIENT_ADMIN_KEY"):
        env.pop(key, None)
    # `adapter-client` as installed by pyproject's [project.scripts], without needing a reinstall
    shim = f'adapter-client() {{ "{sys.executable}" -m clients.cli "$@"; }}\nset -euo pipefail\n'
    outputs = []
    for lang, code in blocks:
        code = code.replace("http://localhost:8000", demo_server.url)
        cmd = ["bash", "-c", shim + code] if lang == "bash" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{lang} block failed:\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
        outputs.append(r.stdout)
    assert expect_lora in outputs[0] and "merged: my-lora" in outputs[0]
    assert expect_lora in outputs[1] and "gone: 404" in outputs[1]
