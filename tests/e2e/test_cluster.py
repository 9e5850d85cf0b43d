"""Scale-out on Ray Serve: `adapter-server serve --replicas 2` on a local Ray instance (2 CPU
replicas of a tiny model, one Ray instance for the module), driven through HTTP by the same
requests and client as the single-process tests. Outputs are checked against the oracle
libraries (PEFT, AdapterHub `adapters`), like the single-process server's in test_adapter_store.

The test process also joins the Ray instance as a second driver, to ask every replica directly
(a handle's `broadcast`) what the HTTP API cannot show: that each one refuses a deleted adapter,
and how many device-cache hits each had.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import importlib.util

import httpx
import pytest

if importlib.util.find_spec("ray") is None:  # the `cluster` extra
    pytest.skip("ray[serve] is not installed", allow_module_level=True)
pytest.importorskip("peft")

from clients import AdapterServerClient  # noqa: E402
from tests.support.every_type import ADMIN, EVERY_TYPE, INFER, LORA_SETS, PROMPT, STEPS, upload  # noqa: E402
from tests.support.live import ServerProcess  # noqa: E402
from tests.support.tiny import decode, hf_model, save_checkpoint  # noqa: E402

APP = "adapter-server"
MAX_SEQ_LEN = 2048  # long enough for a stream that outlives a SIGKILL
LONG = 1500  # tokens of that stream


class Cluster:
    """The server process starts in the background (Ray takes a while); `ready` waits for it."""

    def __init__(self, tmp: Path, root: Path):
        ckpt = save_checkpoint(hf_model("llama", max_position_embeddings=4096), tmp / "tiny-llama")
        self.store = tmp / "store"
        self.flags = dict(model=str(ckpt), store_dir=str(self.store), adapter_root=str(root), max_seq_len=MAX_SEQ_LEN,
                          max_batch=4, device_cache_adapters=4, api_key=INFER, admin_key=ADMIN, replicas=2)
        args = [f"--{k.replace('_', '-')}={v}" for k, v in self.flags.items()]
        self.started: list = []
        self.starting = threading.Thread(target=lambda: self.started.append(
            ServerProcess(*args, log_path=tmp / "cluster.log", timeout=300, log_level="info")))
        self.starting.start()

    def ready(self) -> None:
        self.starting.join()
        assert self.started, "the cluster did not start (see the log above)"
        self.server = self.started[0]
        self.url = self.server.url
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        self.user = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {INFER}"}, timeout=120)
        try:
            self.wait(lambda h: len(h["replicas"]) == 2, "both replicas")
            self.join_ray(re.search(r"ray cluster at (\S+)", self.server.log()).group(1))
        except BaseException:
            self.server.stop()
            raise

    @staticmethod
    def join_ray(address: str) -> None:
        """Join the server's Ray instance as a second driver (loopback, its token)."""
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ["RAY_AUTH_MODE"] = "token"
        import ray

        ray.init(address=address, log_to_driver=False, configure_logging=False)

    def health(self) -> dict:
        r = httpx.get(self.url + "/health", timeout=10)
        r.raise_for_status()
        return r.json()

    def wait(self, ready, what: str, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                h = self.health()
                if ready(h):
                    return h
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}:\n{self.server.log()[-3000:]}")

    def engines(self):
        from ray import serve

        return serve.get_deployment_handle("EngineReplica", app_name=APP)

    def each_replica(self, method: str, *args) -> list:
        return self.engines().broadcast(method, *args).results(timeout_s=60)

    def complete(self, model: str, stream: bool = False, max_tokens: int = STEPS, **extra) -> httpx.Response:
        body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": stream, **extra}
        return self.user.post("/v1/completions", json=body)

    def text(self, model: str, **extra) -> str:
        r = self.complete(model, **extra)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def stop(self) -> None:
        import ray

        ray.shutdown()
        self.admin.close()
        self.user.close()
        assert self.server.stop() == 0, self.server.log()[-3000:]


def argmax_ids(model, ids: list[int], steps: int = STEPS) -> list[int]:
    import torch

    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-steps:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    """Starts before the oracle adapters are made (both take a while), then serves them: the
    adapter root holds copies (registration refuses paths that resolve outside the root)."""
    root = tmp_path_factory.mktemp("adapter-root")
    c = Cluster(tmp_path_factory.mktemp("cluster"), root)
    try:
        made = request.getfixturevalue("oracle")[0]
    finally:
        c.ready()
    for entry in made.iterdir():
        shutil.copytree(entry, root / entry.name)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def eight(cluster) -> list[str]:
    """Eight LoRAs registered from the oracle's sets: aff{i} behaves like set{i}."""
    names = [f"aff{i}" for i in range(LORA_SETS)]
    for i, name in enumerate(names):
        assert cluster.admin.post("/v1/adapters/register", json={"name": name, "path": f"set{i}"}).status_code == 201
    return names


def test_the_lifecycle_scenario_answers_through_the_cluster_like_the_libraries(cluster, oracle):
    root, refs = oracle
    for i, name in enumerate(EVERY_TYPE):  # every adapter type, as files, zip and tar.gz
        r = upload(cluster, name, ("files", "zip", "tgz")[i % 3], root / name)
        assert r.status_code == 201, r.text
    for name in EVERY_TYPE:
        assert cluster.text(name) == decode(refs[name]), name
    streamed = ""
    with cluster.user.stream("POST", "/v1/completions", json={"model": "ah-prefix", "prompt": PROMPT, "stream": True,
                                                               "max_tokens": STEPS, "temperature": 0, "ignore_eos": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed += json.loads(line[6:])["choices"][0]["text"]
    assert streamed == decode(refs["ah-prefix"])
    listed = {a["id"] for a in cluster.user.get("/v1/adapters").json()["data"]}
    assert set(EVERY_TYPE) <= listed
    assert set(EVERY_TYPE) <= {m["id"] for m in cluster.user.get("/v1/models").json()["data"]}

    # errors keep their status codes, streamed or not, before any stream starts
    assert cluster.complete("ghost").status_code == 404
    assert cluster.complete("ghost", stream=True).status_code == 404
    assert cluster.complete("peft-lora", stream=True, max_tokens=MAX_SEQ_LEN).status_code == 400
    assert cluster.user.post("/v1/adapters", data={"name": "x"}).status_code == 403

    # chat and the tokenizer endpoints (the ingress tokenizes and renders with its own copy)
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cluster.flags["model"])
    messages = [{"role": "user", "content": "Hello there"}]
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    lora = PeftModel.from_pretrained(hf_model("llama"), root / "peft-lora").eval()
    chat = cluster.user.post("/v1/chat/completions", json={"model": "peft-lora", "messages": messages, "max_tokens": STEPS,
                                                           "temperature": 0, "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == tok.decode(argmax_ids(lora, ids), skip_special_tokens=True)
    assert cluster.user.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"] == tok("Hello")["input_ids"]

    # delete, then upload again under the same name: every replica serves the new copy
    assert cluster.admin.delete("/v1/adapters/peft-lora").json()["deleted"] is True
    assert cluster.complete("peft-lora").status_code == 404
    assert upload(cluster, "peft-lora", "files", root / "peft-lora").status_code == 201
    assert cluster.text("peft-lora") == decode(refs["peft-lora"])

    # the Python client, pointed at the cluster: stream, merge (on every replica), reset, download
    with AdapterServerClient(cluster.url, api_key=ADMIN, timeout=120) as client:
        greedy = dict(max_tokens=STEPS, temperature=0, ignore_eos=True)
        assert "".join(c.text for c in client.stream(PROMPT, model="peft-ia3", **greedy)) == decode(refs["peft-ia3"])
        assert client.merge("ah-lora").merged == "ah-lora" and client.merged().merged == "ah-lora"
        assert all(s.merged == "ah-lora" for s in cluster.each_replica("snapshot"))
        assert client.complete(PROMPT, model="ah-lora", **greedy).text == decode(refs["ah-lora"])
        assert client.complete(PROMPT, model="peft-prompt", **greedy).text == decode(refs["peft-prompt"])
        with pytest.raises(Exception, match="merged"):
            client.delete_adapter("ah-lora")
        assert client.reset().merged is None
        assert all(s.merged is None for s in cluster.each_replica("snapshot"))
        assert (client.download_adapter("ah-ia3", cluster.store.parent / "dl") / "adapter_config.json").exists()


def test_a_delete_is_seen_by_every_replica_at_once(cluster, oracle):
    from adapter_runtime.errors import AdapterNotFound
    from server.cluster.replica import Failed, Reservation

    r = cluster.admin.post("/v1/adapters/register", json={"name": "doomed", "path": "set0"})
    assert r.status_code == 201, r.text
    held = cluster.each_replica("reserve", "doomed", None)  # every replica loads it onto its device
    assert all(isinstance(h, Reservation) for h in held), held
    for h in held:
        cluster.each_replica("release", h.token)
    assert all("doomed" in s.resident for s in cluster.each_replica("snapshot"))

    assert cluster.admin.delete("/v1/adapters/doomed").status_code == 200
    for answer in cluster.each_replica("reserve", "doomed", None):  # the next request, on each replica
        assert isinstance(answer, Failed) and isinstance(answer.error, AdapterNotFound), answer
    assert not any("doomed" in s.resident for s in cluster.each_replica("snapshot"))
    assert cluster.complete("doomed").status_code == 404


def test_sigkill_of_a_replica_mid_stream(cluster, oracle, eight):
    refs = oracle[1]
    name = "kill-me"
    assert cluster.admin.post("/v1/adapters/register", json={"name": name, "path": "set1"}).status_code == 201
    body = {"model": name, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
    chunks, errors, finished = [], [], []
    victim = {}

    def read_stream():
        with httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {INFER}"}, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        errors.append(chunk["error"])
                    else:
                        chunks.append(chunk["choices"][0])
                        if not victim:
                            snaps = cluster.each_replica("snapshot")
                            running = [s for s in snaps if s.engine["running"]]
                            victim.update(replica=running[0].replica, pid=running[0].pid, before={s.replica for s in snaps})
                            os.kill(running[0].pid, signal.SIGKILL)
        finished.append(True)

    reader = threading.Thread(target=read_stream)
    reader.start()
    reader.join(120)
    assert not reader.is_alive(), "the stream hangs after its replica was killed"
    assert finished and victim
    # the client got a clear error (no silent truncation) and no wrong text before it
    assert errors and "failed" in errors[0]["message"] and errors[0]["type"] == "service_unavailable", (errors, len(chunks))
    assert not any(c.get("finish_reason") for c in chunks)

    # new requests go to the surviving replica at once, with the right output
    assert cluster.text(name) == decode(refs["set1"])
    # Ray Serve brings a replacement up; it serves the same adapters with the same outputs
    h = cluster.wait(lambda h: len(h["replicas"]) == 2 and victim["replica"] not in {r["replica"] for r in h["replicas"]},
                     "a replacement replica")
    (replacement,) = {r["replica"] for r in h["replicas"]} - victim["before"]
    for i in range(LORA_SETS):  # spread over both replicas: the replacement takes some
        assert cluster.text(f"aff{i}") == decode(refs[f"set{i % LORA_SETS}"])
    served = {s.replica: s.device_hits + s.device_misses for s in cluster.each_replica("snapshot")}
    assert served[replacement] > 0


def test_the_ingress_restarts_with_the_store_intact(cluster, oracle, eight):
    refs = oracle[1]
    before = sorted(a["id"] for a in cluster.user.get("/v1/adapters").json()["data"])
    pid = cluster.health()["ingress"]["pid"]
    os.kill(pid, signal.SIGKILL)
    h = cluster.wait(lambda h: h["ingress"]["pid"] != pid and len(h["replicas"]) == 2, "a new ingress")
    assert h["status"] == "ok"
    assert sorted(a["id"] for a in cluster.user.get("/v1/adapters").json()["data"]) == before
    assert cluster.text("aff3") == decode(refs["set3"])
    assert cluster.text("peft-lora") == decode(refs["peft-lora"])


def test_metrics_per_replica(cluster):
    from prometheus_client.parser import text_string_to_metric_families

    time.sleep(1.5)  # one sync: the ingress shows what the replicas counted
    families = {f.name: f for f in text_string_to_metric_families(cluster.user.get("/metrics").text)}
    replicas = {r["replica"] for r in cluster.health()["replicas"]}
    ratio = families["adapter_server_replica_device_cache_hit_ratio"]
    assert {s.labels["replica"] for s in ratio.samples} == replicas and all(0 <= s.value <= 1 for s in ratio.samples)
    lookups = families["adapter_server_replica_adapter_cache_hits"].samples + \
        families["adapter_server_replica_adapter_cache_misses"].samples
    assert {s.labels["replica"] for s in lookups} == replicas
    assert any(s.value > 0 for s in families["adapter_server_http_requests"].samples)


def hit_rate(cluster, names: list[str], rounds: int) -> float:
    """Device-cache hit rate of `rounds` round-robin passes over `names` (after one warm-up pass)."""
    for name in names:
        assert cluster.complete(name, max_tokens=1).status_code == 200
    before = cluster.each_replica("snapshot")
    for _ in range(rounds):
        for name in names:
            assert cluster.complete(name, max_tokens=1).status_code == 200
    after = {s.replica: s for s in cluster.each_replica("snapshot")}
    hits = sum(after[s.replica].device_hits - s.device_hits for s in before)
    misses = sum(after[s.replica].device_misses - s.device_misses for s in before)
    assert hits + misses == rounds * len(names)
    return hits / (hits + misses)


def redeploy(cluster, routing: str) -> None:
    """The same application with another request router (new replicas: cold caches)."""
    from ray import serve

    from server import cluster as scale
    from server.settings import Settings

    old = {s.replica for s in cluster.each_replica("snapshot")}
    settings = Settings.from_env(**cluster.flags, routing=routing)
    serve.run(scale.build(settings), name=APP, route_prefix="/")
    cluster.wait(lambda h: len(h["replicas"]) == 2 and not old & {r["replica"] for r in h["replicas"]}, "new replicas")


def test_affinity_routing_doubles_the_device_cache_hit_rate_of_random_routing(cluster, eight):
    """8 adapters in round-robin traffic, 2 replicas with room for 4 each (last: it redeploys)."""
    affinity = hit_rate(cluster, eight, rounds=4)
    redeploy(cluster, "random")
    uniform = hit_rate(cluster, eight, rounds=4)
    print(f"device-cache hit rate, 8 adapters round-robin, 2 replicas x 4 slots: affinity {affinity:.2f}, "
          f"random {uniform:.2f}")
    assert affinity >= 2 * uniform and affinity > 0.9




def test_the_serve_config_file_builds_the_application():
    """docker/ray-serve.yaml: `serve run` imports app_builder with these args; its deployment
    names and settings must exist (no Ray instance needed to build the application)."""
    import yaml

    from ray.serve import Application

    from server import cluster
    from server.settings import Settings

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker" / "ray-serve.yaml").read_text())
    app = config["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("server.cluster", "app_builder")
    assert set(app["args"]) <= set(Settings.model_fields)
    assert {d["name"] for d in app["deployments"]} == {"EngineReplica", "Ingress"}
    for name in app["runtime_env"]["env_vars"]:
        assert name.startswith("ADAPTER_SERVER_") and name[len("ADAPTER_SERVER_"):].lower() in Settings.model_fields
    assert isinstance(cluster.app_builder(app["args"]), Application)


def test_requests_route_by_their_adapter_set():
    from server.cluster.routing import key_names, random_key, routing_key

    assert routing_key("base", None, "base") == ""  # the base model: no affinity
    assert routing_key("a", None, "base") == routing_key("base", ["a"], "base")
    assert routing_key("b", ["b", "a"], "base") == routing_key("base", ["a", "b"], "base")  # a stack: its set
    assert key_names(routing_key("base", ["x", "y"], "base")) == {"x", "y"}
    assert key_names(random_key()) == frozenset() and random_key() != random_key()
