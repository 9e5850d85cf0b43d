"""`adapter-client` through subprocess against a live server: a whole session on a PEFT LoRA
made by PEFT itself, exit codes, and the examples of the README's clients section run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import httpx

from clients import ConnectionFailed, ServerError, TooLarge
from clients.cli import exit_code
from tests.test_client import (ADMIN_KEY, MAX_UPLOAD, PROMPT, USER_KEY, base_hf, decode, make_peft_lora, peft_greedy,
                               serve)
from tests.test_server import free_port, greedy_ids, stop_server

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HELLO = "Hello"  # the CLI sends text; the byte tokenizer makes it PROMPT's ids


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(url, work dir holding ./my-lora, expected base text, expected LoRA text)."""
    tmp = tmp_path_factory.mktemp("cli")
    proc, url = serve(tmp)
    lora = make_peft_lora(tmp / "my-lora")
    yield url, tmp, decode(greedy_ids(base_hf(), PROMPT, 8)), decode(peft_greedy(lora, PROMPT, 8))
    stop_server(proc)


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
    assert "100%" in ok(up) + up.stderr and "[" in up.stderr
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


def clients_section() -> str:
    """The README's quick-start section for the clients (between its marker comments)."""
    text = README.read_text()
    return text[text.index("<!-- clients:start -->") : text.index("<!-- clients:end -->")]


def doc_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) for the runnable fenced blocks of a Markdown page, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M) if m[1] in ("bash", "python")]


def test_docs_examples_run(live):
    """Every `bash` / `python` block of the README's clients section, in order, with the documented URL
    pointed at the live server (started with the documented keys)."""
    url, cwd, _, expect_lora = live
    section = clients_section()
    blocks = doc_blocks(section)
    assert [lang for lang, _ in blocks] == ["bash", "python", "python"]
    assert "--api-key user-secret --admin-key admin-secret" in section
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("ADAPTER_SERVER_URL", "ADAPTER_SERVER_API_KEY", "ADAPTER_CLIENT_URL", "ADAPTER_CLIENT_API_KEY",
                "ADAPTER_CLIENT_ADMIN_KEY"):
        env.pop(key, None)
    # `adapter-client` as installed by pyproject's [project.scripts], without needing a reinstall
    shim = f'adapter-client() {{ "{sys.executable}" -m clients.cli "$@"; }}\nset -euo pipefail\n'
    outputs = []
    for lang, code in blocks:
        code = code.replace("http://localhost:8000", url)
        cmd = ["bash", "-c", shim + code] if lang == "bash" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{lang} block failed:\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
        outputs.append(r.stdout)
    assert expect_lora in outputs[0] and "merged: my-lora" in outputs[0]
    assert expect_lora in outputs[1] and "gone: 404" in outputs[1]
