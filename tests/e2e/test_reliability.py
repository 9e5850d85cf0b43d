"""Operability and faults, against real `python -m server serve` processes: metrics that count a scripted sequence exactly,
graceful SIGTERM, kill -9 during an upload, corrupted stored adapters, and an engine that
survives a failing request. Expected outputs come from the PEFT library, never the server.
(Request ids and limits: in-process, tests/server/test_limits.py.)"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.live import ServerProcess, age_leftovers

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.support.oracles import greedy_library, peft_adapter  # noqa: E402
from tests.support.tiny import decode, hf_model, save_checkpoint  # noqa: E402

PROMPT = [5, 17, 99, 230, 42]
STEPS = 4
EMBEDDED = "tiny-llama-embedded"


class Live:
    """A server process whose output goes to a log file (a pipe nobody reads could fill up)."""

    def __init__(self, tmp: Path, *args: str, timeout: float = 90.0):
        self.log = tmp / f"server-{time.monotonic_ns()}.log"
        self.server = ServerProcess(*args, log_path=self.log, timeout=timeout, log_level=None)
        self.proc, self.url = self.server.proc, self.server.url

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)

    def complete(self, model: str, **extra) -> httpx.Response:
        body = {"model": model, "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True, **extra}
        return self.post("/v1/completions", json=body)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> int:
        return self.server.stop()


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Three PEFT LoRAs for the tiny Llama and their library outputs (greedy, no cache)."""
    root = tmp_path_factory.mktemp("loras")
    ckpt = save_checkpoint(hf_model("llama"), tmp_path_factory.mktemp("ckpt") / "tiny-llama")
    refs = {}
    for i, name in enumerate(["a", "b", "c"]):
        config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        directory, model = peft_adapter("llama", config, root / name, seed=10 + i)
        refs[name] = decode(greedy_library(model, PROMPT, STEPS))
    assert len(set(refs.values())) == 3
    return ckpt, root, refs


def files_of(directory: Path) -> list:
    return [("files", (f.name, f.read_bytes())) for f in sorted(directory.iterdir()) if f.is_file()]


def upload(live: Live, name: str, directory: Path) -> None:
    r = live.post("/v1/adapters", data={"name": name}, files=files_of(directory))
    assert r.status_code == 201, r.text


# ----------------------------------------------------------------------------- metrics


def test_metrics_count_a_scripted_sequence_exactly(tmp_path, loras):
    ckpt, root, refs = loras
    live = Live(tmp_path, "--model", str(ckpt), "--max-seq-len", "64", "--store-dir", str(tmp_path / "store"),
                "--device-cache-adapters", "1")
    try:
        upload(live, "a", root / "a")  # uploads leave the adapter in the host tier, not on the device
        upload(live, "b", root / "b")
        m0 = live.metrics()
        script = ["tiny-llama", "tiny-llama", "a", "a", "b", "a"]  # device: miss, hit, miss+evict a, miss+evict b
        for model in script:
            r = live.complete(model)
            assert r.status_code == 200, r.text
            if model in refs:
                assert r.json()["choices"][0]["text"] == refs[model]
        with httpx.stream("POST", live.url + "/v1/completions", timeout=60,
                          json={"model": "b", "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0,
                                "ignore_eos": True, "stream": True}) as s:
            assert "data: [DONE]" in list(s.iter_lines())  # b: device miss, evicts a
        assert live.complete("ghost").status_code == 404
        m = live.metrics()
    finally:
        assert live.stop() == 0

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return m.get(key, 0.0) - m0.get(key, 0.0)

    n = len(script) + 1
    p = "adapter_server_"
    assert delta(p + "adapter_requests_total", adapter="tiny-llama") == 2
    assert delta(p + "adapter_requests_total", adapter="a") == 3
    assert delta(p + "adapter_requests_total", adapter="b") == 2
    assert delta(p + "adapter_requests_total", adapter="ghost") == 0
    assert delta(p + "engine_requests_total") == n
    assert delta(p + "prompt_tokens_total") == n * len(PROMPT)
    assert delta(p + "completion_tokens_total") == n * STEPS
    assert delta(p + "time_to_first_token_seconds_count") == n
    assert delta(p + "adapter_cache_hits_total", tier="device") == 1
    assert delta(p + "adapter_cache_misses_total", tier="device") == 4
    assert delta(p + "adapter_cache_hits_total", tier="host") == 4
    assert delta(p + "adapter_loads_total", source="host") == 4
    assert delta(p + "adapter_load_seconds_count", source="host") == 4
    assert delta(p + "adapter_cache_evictions_total", tier="device") == 3
    assert delta(p + "http_requests_total", method="POST", route="/v1/completions", status="200") == n
    assert delta(p + "http_requests_total", method="POST", route="/v1/completions", status="404") == 1
    assert delta(p + "http_request_duration_seconds_count", method="POST", route="/v1/completions") == n + 1
    assert m[(p + "queue_depth", ())] == 0 and m[(p + "running_requests", ())] == 0


# ----------------------------------------------------------------------------- shutdown


def read_stream(client: httpx.Client, url: str, body: dict, first: threading.Event, out: list) -> None:
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                first.set()


@pytest.mark.parametrize("grace,finishes", [(60.0, True), (0.5, False)])
def test_sigterm_finishes_or_cleanly_fails_running_streams_and_exits_0(tmp_path, grace, finishes):
    store = tmp_path / "store"
    live = Live(tmp_path, "--max-seq-len", "2048", "--store-dir", str(store), "--shutdown-grace-s", str(grace))
    body = {"model": EMBEDDED, "prompt": "x", "max_tokens": 1500 if finishes else 2000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    first, out = threading.Event(), []
    with httpx.Client(timeout=120) as client:
        reader = threading.Thread(target=read_stream, args=(client, live.url, body, first, out))
        reader.start()
        assert first.wait(30)
        live.proc.send_signal(signal.SIGTERM)
        if finishes:  # while it drains, the server still answers: 503 for anything new, not "connection refused"
            deadline = time.monotonic() + 30
            while (r := live.complete(EMBEDDED)).status_code != 503:
                assert r.status_code == 200 and time.monotonic() < deadline, r.text
            assert "shutting down" in r.json()["error"]["message"] or "not running" in r.json()["error"]["message"]
            assert httpx.get(live.url + "/health", timeout=10).status_code == 503
        reader.join(120)
    assert live.proc.wait(60) == 0
    assert out[-1] == "[DONE]"
    chunks = [json.loads(c) for c in out[:-1]]
    if finishes:
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks) > 100
    else:
        assert "shut down" in chunks[-1]["error"]["message"] and chunks[-1]["error"]["type"] == "service_unavailable"
    assert not [p for p in store.iterdir() if p.name.startswith(".tmp-")]


# ----------------------------------------------------------------------------- crashes and corruption


def slow_multipart(name: str, directory: Path, boundary: str, started: threading.Event):
    """A multipart upload body that trickles out: the process dies before it is complete."""
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'.encode()
    for f in sorted(directory.iterdir()):
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{f.name}"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        data = f.read_bytes()
        for i in range(0, len(data), 512):
            yield data[i:i + 512]
            started.set()
            time.sleep(0.1)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def test_kill_9_during_an_upload_then_restart(tmp_path, loras):
    ckpt, root, refs = loras
    store = tmp_path / "store"
    args = ("--model", str(ckpt), "--max-seq-len", "64", "--store-dir", str(store))
    live = Live(tmp_path, *args)
    upload(live, "a", root / "a")
    upload(live, "b", root / "b")
    started, boundary = threading.Event(), "reliability-boundary"
    body = slow_multipart("c", root / "c", boundary, started)

    def send() -> None:
        try:
            httpx.post(live.url + "/v1/adapters", content=body, timeout=60,
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        except httpx.HTTPError:
            pass  # the server dies under it

    sender = threading.Thread(target=send)
    sender.start()
    assert started.wait(30)
    time.sleep(0.3)
    live.proc.kill()  # SIGKILL: no cleanup of any kind
    live.proc.wait()
    sender.join(60)
    (store / ".tmp-interrupted").mkdir()  # what a kill inside the store's own write would leave
    (store / ".tmp-interrupted" / "adapter_config.json").write_text("{")
    age_leftovers(store)  # the kill was long ago: fresh temp folders could be a live replica's write

    live = Live(tmp_path, *args)
    try:
        names = [a["id"] for a in httpx.get(live.url + "/v1/adapters").json()["data"]]
        assert names == ["a", "b"]  # c: none of it
        assert not [p.name for p in store.iterdir() if p.name.startswith(".")]
        for name in ("a", "b"):
            assert live.complete(name).json()["choices"][0]["text"] == refs[name]
        upload(live, "c", root / "c")  # and the name is free for a complete upload
        assert live.complete("c").json()["choices"][0]["text"] == refs["c"]
    finally:
        assert live.stop() == 0


def corrupt(path: Path) -> None:
    """Flip bytes in the tensor data, keeping size and header: only a checksum can tell."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_adapters_are_skipped_at_start_and_failing_requests_spare_the_engine(tmp_path, loras):
    ckpt, root, refs = loras
    store = tmp_path / "store"
    args = ("--model", str(ckpt), "--max-seq-len", "64", "--store-dir", str(store))
    live = Live(tmp_path, *args)
    for name in ("a", "b", "c"):
        upload(live, name, root / name)
    assert live.stop() == 0

    corrupt(store / "a" / "adapter_model.safetensors")  # before the start: skipped, reported
    live = Live(tmp_path, *args)
    try:
        assert "skipping stored adapter" in live.log.read_text() and "sha256" in live.log.read_text()
        assert [a["id"] for a in httpx.get(live.url + "/v1/adapters").json()["data"]] == ["b", "c"]
        assert live.metrics()[("adapter_server_store_skipped_adapters", ())] == 1
        assert live.complete("a").status_code == 404

        corrupt(store / "c" / "adapter_model.safetensors")  # after the start, before its first load
        r = live.complete("c")
        assert r.status_code == 422 and "corrupted" in r.json()["error"]["message"]
        for name in ("b", "tiny-llama", "b"):  # the next requests are served, with exact outputs
            r = live.complete(name)
            assert r.status_code == 200
            if name in refs:
                assert r.json()["choices"][0]["text"] == refs[name]
    finally:
        assert live.stop() == 0


def test_a_request_that_fails_inside_the_engine_does_not_stop_the_loop():
    from adapter_runtime.engine import Request, build_engine
    from adapter_runtime.errors import AdapterRuntimeError
    from adapter_runtime.sampling import SamplingParams

    engine = build_engine(None, device="cpu")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with engine:
        want = engine.submit(Request(tuple(PROMPT), params)).result(30).token_ids
        forward, calls = engine.model.forward, []

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) in (1, 4):  # a prefill and a decode step fail
                raise RuntimeError("injected fault")
            return forward(*args, **kwargs)

        engine.model.forward = flaky
        for _ in range(2):
            with pytest.raises(AdapterRuntimeError, match="internal error") as e:
                engine.submit(Request(tuple(PROMPT), params)).result(30)
            assert "injected fault" not in str(e.value)  # the details go to the log only
        got = [engine.submit(Request(tuple(PROMPT), params)) for _ in range(3)]
        assert [h.result(30).token_ids for h in got] == [want] * 3
        assert engine.running
