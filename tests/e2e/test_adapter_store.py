"""Adapter uploads, the on-disk store and the tiered cache, over real HTTP against a real
`python -m server serve` process. Expected outputs come from the oracle libraries (PEFT and
AdapterHub `adapters`, greedy argmax loops without a KV cache), never from the server itself."""

from __future__ import annotations

import io
import json
import os
import pickle
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.support.every_type import (ADMIN, EVERY_TYPE, INFER, LORA_SETS, PROMPT, STEPS, argmax_loop, files_parts,
                                      tgz_bytes, upload, zip_bytes)
from tests.support.live import age_leftovers, start_server, stop_server
from tests.support.tiny import decode, hf_model, save_checkpoint

MAX_UPLOAD = 2 << 20


class Server:
    def __init__(self, ckpt: Path, store: Path, root: Path):
        self.args = ["--model", str(ckpt), "--max-seq-len", "64", "--max-batch", "16", "--store-dir", str(store),
                     "--adapter-root", str(root), "--device-cache-adapters", "16", "--host-cache-bytes", str(256 << 10),
                     "--max-upload-bytes", str(MAX_UPLOAD), "--api-key", INFER, "--admin-key", ADMIN]
        self.store = store
        self.start()

    def start(self) -> None:
        self.proc, self.url = start_server(*self.args)
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        self.user = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {INFER}"}, timeout=60)

    def stop(self) -> None:
        self.admin.close()
        self.user.close()
        stop_server(self.proc)

    def complete(self, model: str, stream: bool = False, client: httpx.Client | None = None) -> str:
        body = {"model": model, "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        client = client or self.user
        if not stream:
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        text = ""
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += chunk["choices"][0]["text"]
        return text

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))

    def names(self) -> list[str]:
        return [a["id"] for a in self.user.get("/v1/adapters").json()["data"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory, oracle):
    hf = hf_model("llama")
    ckpt = save_checkpoint(hf, tmp_path_factory.mktemp("ckpt") / "tiny-llama")
    s = Server(ckpt, tmp_path_factory.mktemp("store"), oracle[0])
    yield s
    s.stop()


# ----------------------------------------------------------------------------- upload helpers


@pytest.fixture(scope="module")
def uploaded(server, oracle):
    root, refs = oracle
    for i, name in enumerate(EVERY_TYPE):
        r = upload(server, name, ("files", "zip", "tgz")[i % 3], root / name)
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["id"] == name and info["object"] == "adapter" and info["parameters"] > 0 and not info["merged"]
    return refs


# ----------------------------------------------------------------------------- tests


def test_every_adapter_type_uploaded_answers_like_its_library(server, uploaded):
    for name in EVERY_TYPE:
        assert server.complete(name) == decode(uploaded[name]), name
    listed = {a["id"]: a for a in server.user.get("/v1/adapters").json()["data"]}
    assert set(EVERY_TYPE) <= set(listed)
    assert listed["peft-lora"]["format"] == "peft" and listed["ah-compacter"]["format"] == "adapterhub"
    assert listed["ah-compacter"]["method"] == "compacter" and listed["peft-prompt"]["method"] == "prompt_tuning"
    assert listed["peft-lora"]["requests_served"] >= 1
    assert {a["location"] for a in listed.values()} <= {"disk", "host", "device"}
    models = [m["id"] for m in server.user.get("/v1/models").json()["data"]]
    assert models[0] == "tiny-llama" and set(EVERY_TYPE) <= set(models)
    # the stored folders are normalized: safetensors only, no pickles, no head files
    for name in EVERY_TYPE:
        stored = {f.name for f in (server.store / name).iterdir()}
        assert "meta.json" in stored and not any(f.endswith(".bin") for f in stored), stored


def test_stored_files_reload_in_peft(server, uploaded, tmp_path):
    from peft import PeftModel

    r = server.user.get("/v1/adapters/peft-ia3/files")  # uploaded as .bin, stored as safetensors
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(hf_model("llama"), tmp_path).eval()
    assert argmax_loop(model) == uploaded["peft-ia3"]


def test_keys_are_required(server, oracle):
    root = oracle[0]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/adapters", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = upload(server, "sneaky", "files", root / "set0", client=server.user)
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    assert server.user.delete("/v1/adapters/peft-lora").status_code == 403
    assert "sneaky" not in server.names()


def test_bad_uploads_are_refused_and_change_nothing(server, uploaded, oracle, tmp_path):
    root = oracle[0]
    before_names, before_dirs = server.names(), sorted(p.name for p in server.store.iterdir())
    good = root / "peft-lora"
    config = (good / "adapter_config.json").read_bytes()
    weights = (good / "adapter_model.safetensors").read_bytes()

    def post_archive(filename: str, data: bytes):
        return server.admin.post("/v1/adapters", data={"name": "bad"}, files=[("archive", (filename, data))])

    cases = {}
    cases["truncated"] = post_archive("a.zip", zip_bytes(good)[:-300])
    cases["truncated tgz"] = post_archive("a.tar.gz", tgz_bytes({"adapter_config.json": config, "adapter_model.safetensors": weights})[:200])
    cases["dotdot"] = post_archive("a.tar.gz", tgz_bytes({"adapter_config.json": config, "../evil": b"x"}))
    cases["absolute"] = post_archive("a.tar.gz", tgz_bytes({"/etc/evil": b"x", "adapter_config.json": config}))
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("adapter_config.json", config)
        z.writestr("../../x.safetensors", weights)
    cases["zip dotdot"] = post_archive("a.zip", zbuf.getvalue())
    cases["oversized"] = server.admin.post("/v1/adapters", data={"name": "bad"},
                                           files=[("files", ("adapter_config.json", config)),
                                                  ("files", ("big.bin", b"\0" * (MAX_UPLOAD + 1)))])
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    cases["shape"] = server.admin.post("/v1/adapters", data={"name": "bad"}, files=[
        ("files", ("adapter_config.json", config)),
        ("files", ("adapter_model.safetensors", (tmp_path / "w.safetensors").read_bytes()))])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    cases["pickle"] = server.admin.post("/v1/adapters", data={"name": "bad"}, files=[
        ("files", ("adapter_config.json", config)), ("files", ("adapter_model.bin", pickle.dumps({"w": Evil()})))])
    cases["duplicate"] = upload(server, "peft-lora", "files", good)
    cases["bad name"] = server.admin.post("/v1/adapters", data={"name": "../x"}, files=files_parts(good))

    expected = {"truncated": (400, "corrupt or truncated"), "truncated tgz": (400, "corrupt or truncated"),
                "dotdot": (400, ".."), "absolute": (400, "absolute"), "zip dotdot": (400, ".."),
                "oversized": (413, "max_upload_bytes"), "shape": (422, "shape"), "pickle": (422, "pickle"),
                "duplicate": (409, "already"), "bad name": (400, "invalid adapter name")}
    for case, (status, words) in expected.items():
        r = cases[case]
        assert r.status_code == status and words in r.json()["error"]["message"], (case, r.status_code, r.text)
    assert server.names() == before_names
    assert sorted(p.name for p in server.store.iterdir()) == before_dirs


def test_register_only_below_the_adapter_root(server, oracle, tmp_path):
    r = server.admin.post("/v1/adapters/register", json={"name": "outside", "path": str(tmp_path)})
    assert r.status_code == 403 and "outside" in r.json()["error"]["message"]
    r = server.admin.post("/v1/adapters/register", json={"name": "escape", "path": "set0/../../"})
    assert r.status_code == 403
    r = server.admin.post("/v1/load_lora_adapter", json={"lora_name": "vllm-lora", "lora_path": "set3"})
    assert r.status_code == 200, r.text
    assert server.complete("vllm-lora") == decode(oracle[1]["set3"])
    assert server.admin.post("/v1/unload_lora_adapter", json={"lora_name": "vllm-lora"}).status_code == 200
    assert server.user.post("/v1/completions", json={"model": "vllm-lora", "prompt": "hi"}).status_code == 404
    assert server.admin.delete("/v1/adapters/vllm-lora").status_code == 404


def test_concurrent_streams_while_adapters_come_and_go(server, uploaded, oracle):
    refs = oracle[1]
    names = EVERY_TYPE + [f"set{i}" for i in range(6)]  # 16 adapters of every type
    for i in range(6):
        if f"set{i}" not in server.names():
            assert server.admin.post("/v1/adapters/register", json={"name": f"set{i}", "path": f"set{i}"}).status_code == 201
    stop = threading.Event()
    churned = []

    def churn():
        k = 0
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as c:
            while not stop.is_set():
                name = f"churn-{k}"
                assert upload(server, name, "files", oracle[0] / "set7", client=c).status_code == 201
                assert c.delete(f"/v1/adapters/{name}").json()["deleted"] is True
                churned.append(name)
                k += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        jobs = [names[i % len(names)] for i in range(32)]
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(lambda n: server.complete(n, stream=True, client=httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {INFER}"}, timeout=60)), jobs))
    finally:
        stop.set()
        worker.join()
    assert got == [decode(refs[n]) for n in jobs]
    assert churned and not any(n.startswith("churn-") for n in server.names())


def test_a_thousand_adapters_with_a_device_budget_of_16(server, oracle):
    refs = oracle[1]
    existing = set(server.names())

    def register(i: int) -> None:
        name = f"many-{i:04d}"
        if name not in existing:
            r = server.admin.post("/v1/adapters/register", json={"name": name, "path": f"set{i % LORA_SETS}"})
            assert r.status_code == 201, r.text

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(register, range(1000)))
    assert sum(n.startswith("many-") for n in server.names()) == 1000
    rss_before = server.rss_kib()
    picks = list(range(0, 1000, 7))  # requests spread over the whole range
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: server.complete(f"many-{i:04d}"), picks))
    assert got == [decode(refs[f"set{i % LORA_SETS}"]) for i in picks]
    stats = server.user.get("/health").json()["adapters"]
    growth_mib = (server.rss_kib() - rss_before) / 1024
    print(f"after {len(picks)} requests over 1,000 adapters: {stats}, RSS growth {growth_mib:.1f} MiB")
    assert stats["device_adapters"] <= 16 and stats["pinned"] == 0
    assert stats["host_bytes"] <= 256 << 10
    assert growth_mib < 64
    located = [a["location"] for a in server.user.get("/v1/adapters").json()["data"] if a["id"].startswith("many-")]
    assert located.count("device") <= 16 and located.count("disk") >= 1000 - 16 - stats["host_adapters"] > 800


def test_restart_keeps_adapters_and_outputs(server, uploaded, oracle):
    names = server.names()
    server.stop()
    (server.store / ".tmp-crashed-upload").mkdir()  # what a crash mid-upload leaves behind
    (server.store / ".tmp-crashed-upload" / "adapter_config.json").write_text("{}")
    age_leftovers(server.store)
    broken = server.store / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("not json")
    server.start()
    assert server.names() == names  # the broken folder is skipped, not fatal
    assert not (server.store / ".tmp-crashed-upload").exists()
    for name in ("peft-prefix", "peft-prompt", "ah-inv", "ah-prefix", "ah-lora", "many-0003"):
        want = uploaded.get(name) or oracle[1][f"set{3 % LORA_SETS}"]
        assert server.complete(name) == decode(want), name


def test_pinned_adapters_are_never_evicted_and_the_device_tier_may_overflow(oracle, tmp_path):
    from adapter_runtime.errors import AdapterNotFound
    from adapter_runtime.models import load_model
    from adapter_runtime.registry import AdapterRegistry, CacheLimits
    from adapter_runtime.store import AdapterStore

    info = load_model(save_checkpoint(hf_model("llama"), tmp_path / "ckpt")).info
    store = AdapterStore(tmp_path / "store", info)
    reg = AdapterRegistry("base", store=store, limits=CacheLimits(device_adapters=2, host_bytes=0))
    for i in range(4):
        reg.add(f"a{i}", oracle[0] / f"set{i}")
    held = [reg.acquire(f"a{i}") for i in range(3)]  # three running requests, room for two
    assert reg.stats()["device_adapters"] == 3 and reg.stats()["pinned"] == 3  # overflow, no deadlock
    reg.get("a3")  # an unpinned newcomer cannot push out a pinned adapter
    assert [reg.status(f"a{i}").location for i in range(3)] == ["device"] * 3
    reg.delete("a1")  # DELETE while a request holds it: gone for new requests ...
    with pytest.raises(AdapterNotFound):
        reg.acquire("a1")
    assert held[1][0].linear  # ... while the running request keeps its tensors
    for setup in held:
        reg.release(setup)
    stats = reg.stats()
    assert stats["device_adapters"] <= 2 and stats["pinned"] == 0 and stats["host_adapters"] == 0
    assert reg.status("a0").requests_served == 1 and "a1" not in reg.names()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["a0", "a2", "a3"]


def test_without_keys_the_server_binds_to_localhost_and_says_so(caplog, monkeypatch):
    from server.auth import bind_host
    from server.settings import Settings

    assert bind_host(Settings(host="0.0.0.0")).host == "127.0.0.1"
    assert "binds to 127.0.0.1 only" in caplog.text
    assert bind_host(Settings(host="0.0.0.0", admin_key="k")).host == "0.0.0.0"
    monkeypatch.setenv("ADAPTER_SERVER_MAX_UPLOAD_BYTES", "5")
    monkeypatch.setenv("ADAPTER_SERVER_ADMIN_KEY", "x")
    s = Settings.from_env()
    assert (s.max_upload_bytes, s.admin_key, s.device_cache_adapters, s.max_lora_rank) == (5, "x", 16, 256)


def test_concurrent_requests_for_an_uncached_adapter_load_it_once(oracle, tmp_path):
    import threading
    import time as _time

    from adapter_runtime.models import load_model
    from adapter_runtime.registry import AdapterRegistry, CacheLimits
    from adapter_runtime.store import AdapterStore

    info = load_model(save_checkpoint(hf_model("llama"), tmp_path / "ckpt")).info
    store = AdapterStore(tmp_path / "store", info)
    reg = AdapterRegistry("base", store=store, limits=CacheLimits(device_adapters=2, host_bytes=0))
    reg.add("a0", oracle[0] / "set0")
    reg.add("a1", oracle[0] / "set1")
    reg.add("a2", oracle[0] / "set2")  # a0 is now off the device and the host
    loads = []
    real_load = store.load

    def slow_load(meta):
        loads.append(meta.name)
        _time.sleep(0.2)  # long enough for every thread to ask while the first one loads
        return real_load(meta)

    store.load = slow_load
    got = []
    threads = [threading.Thread(target=lambda: got.append(reg.acquire("a0"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["a0"] and len(got) == 6 and all(setup[0] is got[0][0] for setup in got)
    assert reg.stats()["pinned"] == 1
    for setup in got:
        reg.release(setup)
