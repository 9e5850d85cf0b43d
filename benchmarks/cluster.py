"""Scale-out on Ray Serve: requests/s and device-cache hit rate for 1 vs 2 engine replicas,
64 LoRA adapters with room for 16 per replica, Zipf and uniform popularity, adapter-affinity
vs uniform random routing. `python -m benchmarks.cluster [--quick]` (its own Ray instance).

Every request names one adapter (drawn from the popularity law, seeded), 16 prompt tokens,
8 new tokens, greedy; `concurrency` clients send them back to back through HTTP. A device
miss loads the adapter from disk (host cache off), as a GPU server would copy it from the host.
Hit rates come from each replica's registry (device-tier lookups), not from the router.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

NAME = "cluster"
ADAPTERS, SLOTS = 64, 16
PROMPT = list(range(10, 26))


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=299, eos_token_id=299, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def make_adapters(root: Path, n: int) -> None:
    from peft import LoraConfig, get_peft_model

    for i in range(n):
        model = get_peft_model(base_model(), LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(root / f"lora{i}")


def popularity(kind: str, n: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    if kind == "uniform":
        return [rng.randrange(n) for _ in range(count)]
    order = list(range(n))
    rng.shuffle(order)  # which adapters are hot is arbitrary
    weights = [1.0 / (rank + 1) for rank in range(n)]  # Zipf, s = 1
    return [order[i] for i in rng.choices(range(n), weights, k=count)]


class Bench:
    def __init__(self, tmp: Path):
        from tests.support.live import free_port
        from tests.support.tiny import save_checkpoint

        self.ckpt = save_checkpoint(base_model(), tmp / "bench-llama")
        self.root = tmp / "adapters"
        make_adapters(self.root, ADAPTERS)
        self.store = tmp / "store"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def settings(self, replicas: int, routing: str):
        from server.settings import Settings

        return Settings(model=str(self.ckpt), port=self.port, store_dir=str(self.store), adapter_root=str(self.root),
                        max_batch=8, max_seq_len=64, device_cache_adapters=SLOTS, host_cache_bytes=0,
                        replicas=replicas, routing=routing, replica_cpus=1.0, log_level="warning")

    def deploy(self, replicas: int, routing: str) -> None:
        from ray import serve

        from server import cluster

        serve.run(cluster.build(self.settings(replicas, routing)), name=cluster.APP_NAME, route_prefix="/")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                h = httpx.get(self.url + "/health", timeout=5).json()
                if len(h.get("replicas", [])) == replicas:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError("the cluster did not come up")

    def lookups(self) -> tuple[float, float]:
        from ray import serve

        snaps = serve.get_deployment_handle("EngineReplica", app_name="adapter-server").broadcast("snapshot").results(
            timeout_s=60)
        return sum(s.device_hits for s in snaps), sum(s.device_misses for s in snaps)

    def traffic(self, picks: list[int], concurrency: int) -> float:
        def one(i: int) -> None:
            r = client.post("/v1/completions", json={"model": f"lora{i}", "prompt": PROMPT, "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True})
            r.raise_for_status()

        with httpx.Client(base_url=self.url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, picks))
            return len(picks) / (time.perf_counter() - start)


def run(quick: bool = False) -> str:
    import ray

    from server import cluster

    requests, concurrency = (160, 8) if quick else (400, 8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        bench = Bench(Path(tmp))
        cluster.start_ray(bench.settings(2, "affinity"))
        from ray import serve
        from ray.serve.config import HTTPOptions

        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=bench.port))
        try:
            bench.deploy(1, "affinity")
            with httpx.Client(base_url=bench.url, timeout=60) as c:
                for i in range(ADAPTERS):
                    c.post("/v1/adapters/register", json={"name": f"lora{i}", "path": f"lora{i}"}).raise_for_status()
            for replicas, routing in ((1, "affinity"), (2, "random"), (2, "affinity")):
                if (replicas, routing) != (1, "affinity"):
                    bench.deploy(replicas, routing)  # new replicas: cold caches
                for law in ("zipf", "uniform"):
                    bench.traffic(popularity(law, ADAPTERS, requests // 4, seed=1), concurrency)  # warm-up
                    hits, misses = bench.lookups()
                    rate = bench.traffic(popularity(law, ADAPTERS, requests, seed=2), concurrency)
                    h2, m2 = bench.lookups()
                    hit = (h2 - hits) / max(h2 - hits + m2 - misses, 1)
                    rows.append((replicas, "-" if replicas == 1 else routing, law, rate, hit))
        finally:
            serve.shutdown()
            ray.shutdown()
    lines = [f"## cluster: {ADAPTERS} LoRAs, {SLOTS} device slots per replica, {requests} requests x 8 tokens, "
             f"{concurrency} clients, host cache off",
             f"| replicas | routing | popularity | requests/s | device-cache hit rate |",
             "|---|---|---|---|---|"]
    lines += [f"| {r} | {routing} | {law} | {rate:.1f} | {hit:.2f} |" for r, routing, law, rate, hit in rows]
    return "\n".join(lines)


def simulate(replicas: int, slots: int, adapters: int, requests: int, law: str, routing: str, seed: int = 0) -> float:
    """Device-cache hit rate of `replicas` LRU caches of `slots` adapters each, in a plain loop:
    "affinity" sends each adapter to one home replica (a seeded uniform hash: the router's
    placement without its coldest-device choice or its spill, so a lower bound), "random" sends
    each request anywhere. The first fifth of the requests warms the caches up."""
    rng = random.Random(f"routing-{seed}")  # independent of the popularity draws
    home = [random.Random(a * 7919 + seed).randrange(replicas) for a in range(adapters)]
    caches = [OrderedDict() for _ in range(replicas)]
    hits = counted = 0
    for i, a in enumerate(popularity(law, adapters, requests, seed)):
        cache = caches[home[a] if routing == "affinity" else rng.randrange(replicas)]
        hit = a in cache
        if hit:
            cache.move_to_end(a)
        else:
            cache[a] = True
            if len(cache) > slots:
                cache.popitem(last=False)
        if i >= requests // 5:
            hits, counted = hits + hit, counted + 1
    return hits / counted


def paper() -> str:
    """The figures behind the README's 100 replicas x 100,000 adapters."""
    lines = ["## cluster at scale, simulated LRU device caches (requests after a warm-up fifth)",
             "| replicas x slots | adapters | popularity | random | affinity |", "|---|---|---|---|---|"]
    for replicas, slots, adapters, requests in ((2, 16, 64, 200_000), (100, 64, 100_000, 2_000_000)):
        for law in ("zipf", "uniform"):
            r = simulate(replicas, slots, adapters, requests, law, "random")
            a = simulate(replicas, slots, adapters, requests, law, "affinity")
            lines.append(f"| {replicas} x {slots} | {adapters:,} | {law} | {r:.2f} | {a:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--paper", action="store_true", help="only the cache simulation at scale (no Ray)")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    print(paper() if args.paper else run(quick=args.quick) + "\n\n" + paper(), flush=True)
    print(f"({NAME}: {time.perf_counter() - t:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
