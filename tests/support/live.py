"""A real `python -m server serve` process on a free loopback port, for tests and benchmarks.

Its output goes to a log file, never to a pipe: a pipe nobody reads fills up and stalls the
server. `url` is usable once /health answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, log_path: Path | str | None = None, timeout: float = 120.0,
                 log_level: str | None = "warning"):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="adapter-server-", suffix=".log")[1])
        command = [sys.executable, "-m", "server", "serve", "--port", str(port)]
        command += ["--log-level", log_level] if log_level else []
        with open(self.log_path, "w") as out:
            # eager unless asked: compiling the decode step at startup takes tens of seconds per server
            env = {"ADAPTER_SERVER_COMPILE": "0", **os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen([*command, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"server did not answer /health in {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        """SIGTERM (a graceful drain), then SIGKILL if it has not exited in 30 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(*args: str, timeout: float = 90.0):
    """(process, base url) once /health answers."""
    server = ServerProcess(*args, timeout=timeout)
    return server.proc, server.url


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def age_leftovers(store: Path, seconds: float = 2 * 3600) -> None:
    """Make the store's temp folders (`.tmp-*`, `.trash-*`) look `seconds` old, as a crashed
    write's leftovers are when the server starts again (fresh ones may be another replica's
    write in progress, and are kept)."""
    old = time.time() - seconds
    for entry in store.iterdir():
        if entry.name.startswith((".tmp-", ".trash-")):
            for path in [*entry.rglob("*"), entry]:
                os.utime(path, (old, old), follow_symlinks=False)
