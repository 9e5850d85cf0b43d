"""Issue 4: the adapter lifecycle — how soon a freshly uploaded adapter answers, and whether
many registered adapters slow decoding down.

(i)  Upload to first token, over real HTTP against a live `python -m server serve` process on
     loopback (the same 40M random Llama, saved as a local checkpoint). The adapter files are
     made once with PEFT (LoRA r=8 on q,v; prefix tuning with 16 virtual tokens; weights
     randomized) and uploaded again and again under fresh names: POST /v1/adapters (multipart,
     the directory's files), then at once POST /v1/completions with max_tokens=1 for that
     name. Latency = upload start to the completion's response (its one token). LoRA and
     prefix uploads alternate with a reference row: the same completion on the base model. A second table splits `registry.add` (what the server runs
     after the multipart body is staged) into its phases, timed in this process.

(ii) Decode throughput with 1 vs 1,024 registered adapters (engine in process, requests go
     through `registry.acquire` / `release` like the server's). 32 closed-loop clients; each
     request names a uniformly random adapter (or the single one), with the same seeded
     `max_tokens` (16..48) sequence in both cases. The 1,024 copies of one LoRA are written
     into the store folder before the registry attaches it; device cache 16 adapters, host
     cache the server's default. Every repetition attaches a fresh registry (cold host cache),
     so the 1,024 case loads from disk on first use.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from .common import (ServerProcess, header, hf_base, make_engine, ours_from, params, percentile, prompts,
                     save_checkpoint, save_peft_loras, save_peft_prefix, table, warm_until_compiled)

NAME = "lifecycle"
REGISTERED = 1024
CLIENTS = 32
BASE_ROW = "base model, no upload (reference)"


# ---------------------------------------------------------------------- (i) upload to first token
def dir_files(directory: Path) -> list[tuple[str, bytes]]:
    return [(f.name, f.read_bytes()) for f in sorted(Path(directory).iterdir()) if f.is_file()]


def upload_then_complete(client, name: str, files, prompt: list[int]) -> tuple[float, float]:
    """-> (seconds for the upload, seconds for the max_tokens=1 completion that follows);
    with no files, only the completion (e.g. for the base model)."""
    t0 = time.perf_counter()
    if files:
        r = client.post("/v1/adapters", data={"name": name},
                        files=[("files", (fname, data, "application/octet-stream")) for fname, data in files])
        if r.status_code != 201:
            raise RuntimeError(f"upload of {name} failed: {r.status_code} {r.text}")
    t1 = time.perf_counter()
    r = client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    t2 = time.perf_counter()
    body = r.json()
    if r.status_code != 200 or body["usage"]["completion_tokens"] != 1:
        raise RuntimeError(f"completion for {name} failed: {r.status_code} {body}")
    return t1 - t0, t2 - t1


def upload_latency(root: Path, hf, sources: dict, n: int) -> str:
    import httpx

    ckpt = save_checkpoint(hf, root / "bench-llama")
    server = ServerProcess("--model", str(ckpt), "--store-dir", str(root / "server-store"), "--max-seq-len", "320",
                           "--device-cache-adapters", "16", log_path=root / "server.log")
    files = {kind: dir_files(d) for kind, d in sources.items()}
    files[BASE_ROW] = []  # reference: the same completion on the base model, no upload
    prompt = prompts(1, 32, seed=21)[0]
    samples = {kind: [] for kind in files}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for i in range(-3, n):  # three unrecorded warm-up rounds
                for kind in files:
                    name = ckpt.name if kind == BASE_ROW else f"{kind}-{i + 3}"
                    up, first = upload_then_complete(client, name, files[kind], prompt)
                    if i >= 0:
                        samples[kind].append((up, first))
    finally:
        server.stop()
    rows = []
    for kind, xs in samples.items():
        total = [(u + f) * 1e3 for u, f in xs]
        rows.append([kind, f"{sum(len(b) for _, b in files[kind]) / 1024:.0f} KiB" if files[kind] else "-", len(xs),
                     percentile([u * 1e3 for u, _ in xs], 50), percentile([f * 1e3 for _, f in xs], 50),
                     percentile(total, 50), percentile(total, 99)])
    return table(f"Issue 4 (i): upload to first token over HTTP (live server, loopback), {n} uploads each",
                 ["adapter", "files", "n", "upload p50 ms", "completion p50 ms", "total p50 ms", "total p99 ms"], rows)


def add_phases(root: Path, loaded, sources: dict, n: int) -> str:
    """Time `registry.add`'s phases in process by wrapping the store module's helpers."""
    from adapter_runtime import store as store_mod
    from adapter_runtime.registry import AdapterRegistry, CacheLimits

    phases = ["normalize", "load_adapter", "check_limits", "sha256_file", "_fsync_file", "_fsync_dir"]
    spent: Counter = Counter()
    originals = {p: getattr(store_mod, p) for p in phases}

    def timed(phase, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - t
        return wrapper

    registry = AdapterRegistry(loaded.name, "cpu", store=store_mod.AdapterStore(root / "phase-store", loaded.info),
                               limits=CacheLimits())
    results = {}
    try:
        for p in phases:
            setattr(store_mod, p, timed(p, originals[p]))
        for kind, src in sources.items():
            registry.add(f"{kind}-warm", src)
            spent.clear()
            t = time.perf_counter()
            for i in range(n):
                registry.add(f"{kind}-{i}", src)
            results[kind] = ((time.perf_counter() - t) / n, {p: spent[p] / n for p in phases})
    finally:
        for p, fn in originals.items():
            setattr(store_mod, p, fn)
    labels = {"normalize": "normalize (read, re-save safetensors)", "load_adapter": "load_adapter (validate)",
              "check_limits": "check_limits", "sha256_file": "sha256 of weights", "_fsync_file": "fsync files",
              "_fsync_dir": "fsync dirs"}
    kinds = list(results)
    rows = [[labels[p], *(results[k][1][p] * 1e3 for k in kinds)] for p in phases]
    rows.append(["other (rename, meta.json, cache)", *((results[k][0] - sum(results[k][1].values())) * 1e3 for k in kinds)])
    rows.append(["registry.add total", *(results[k][0] * 1e3 for k in kinds)])
    return table(f"Issue 4 (i): where registry.add spends its time (in process, mean of {n}, ms)",
                 ["phase", *kinds], rows)


# ---------------------------------------------------------------------- (ii) 1 vs 1,024 registered
def fill_store(root: Path, info, lora_dir: Path, count: int):
    """A store folder with `count` copies of one LoRA: added once, then copied folder by folder
    (the copies share the weights file, so its sha256 in meta.json stays right)."""
    from adapter_runtime.store import AdapterStore

    store = AdapterStore(root, info)
    first, _ = store.add("a0000", lora_dir)
    for i in range(1, count):
        name = f"a{i:04d}"
        shutil.copytree(store.path(first.name), store.path(name))
        meta = json.loads((store.path(name) / "meta.json").read_text())
        (store.path(name) / "meta.json").write_text(json.dumps({**meta, "name": name}))
    return [f"a{i:04d}" for i in range(count)]


def fresh_registry(loaded, engine, store_root: Path):
    from adapter_runtime.registry import AdapterRegistry, CacheLimits
    from adapter_runtime.store import AdapterStore
    from server.settings import Settings

    s = Settings()  # the server's default cache limits, with a device budget of 16
    limits = CacheLimits(16, s.device_cache_bytes, s.host_cache_bytes)
    return AdapterRegistry(loaded.name, engine.device, engine.dtype, store=AdapterStore(store_root, loaded.info),
                           limits=limits)


def closed_loop(engine, registry, plans, prompt) -> dict:
    """CLIENTS threads, each running its plan [(adapter name, max_tokens), ...] one request at a time."""
    from adapter_runtime.engine import Request

    events: Counter = Counter()
    load_s = [0.0]

    def observe(event, tier, seconds):
        events[(event, tier)] += 1
        load_s[0] += seconds

    registry.observer = observe
    tokens, errors = [], []

    def client(plan):
        try:
            for name, max_tokens in plan:
                setup = registry.acquire(name)
                try:
                    handle = engine.submit(Request(tuple(prompt), params(max_tokens), setup),
                                           on_done=lambda s=setup: registry.release(s))
                except BaseException:
                    registry.release(setup, served=False)
                    raise
                tokens.append(handle.result(timeout=600).completion_tokens)
        except BaseException as e:
            errors.append(e)

    engine.reset_timers()
    threads = [threading.Thread(target=client, args=(p,)) for p in plans]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    registry.observer = None
    if errors:
        raise errors[0]
    n = sum(tokens)
    assert n == sum(m for p in plans for _, m in p), "every request must run to max_tokens"
    return {"tok_s": n / wall, "decode_tok_s": engine.decode_tokens / engine.decode_s, "tokens": n, "wall": wall,
            "events": events, "load_ms": load_s[0] * 1e3}


def plans_for(names: list[str] | None, per_client: int, seed: int, single: str) -> list[list[tuple[str, int]]]:
    rng = random.Random(seed)
    lengths = [[rng.randint(16, 48) for _ in range(per_client)] for _ in range(CLIENTS)]
    pick = random.Random(seed + 1)
    return [[(pick.choice(names) if names else single, m) for m in row] for row in lengths]


def registered_throughput(root: Path, loaded, lora_dir: Path, quick: bool) -> str:
    engine = make_engine(loaded, max_batch=CLIENTS, max_seq_len=320, compile=True)  # as the server runs
    try:
        names = fill_store(root / "store-1024", loaded.info, lora_dir, REGISTERED)
        fill_store(root / "store-1", loaded.info, lora_dir, 1)
        prompt = prompts(1, 32, seed=31)[0]
        per_client, reps = (2, 1) if quick else (2, 3)
        single = plans_for(None, per_client, 7, "a0000")
        many = plans_for(names, per_client, 7, "a0000")
        def warm_up():
            closed_loop(engine, fresh_registry(loaded, engine, root / "store-1"), plans_for(None, 1, 3, "a0000"), prompt)
            closed_loop(engine, fresh_registry(loaded, engine, root / "store-1024"), plans_for(names, 1, 3, ""), prompt)

        warm_until_compiled(engine, warm_up)
        runs = {"1": [], "1024": []}
        for _ in range(reps):  # interleaved, best of `reps`; a fresh (cold) registry each time
            runs["1"].append(closed_loop(engine, fresh_registry(loaded, engine, root / "store-1"), single, prompt))
            runs["1024"].append(closed_loop(engine, fresh_registry(loaded, engine, root / "store-1024"), many, prompt))
    finally:
        engine.stop()
    best = {k: max(v, key=lambda r: r["tok_s"]) for k, v in runs.items()}
    rows = []
    for k, r in best.items():
        e = r["events"]
        ratio = r["tok_s"] / best["1"]["tok_s"]
        rows.append([f"{k} registered", r["tokens"], r["tok_s"], r["decode_tok_s"], f"{ratio:.2f}x",
                     f"{r['decode_tok_s'] / best['1']['decode_tok_s']:.2f}x",
                     f"{e[('hit', 'device')]}/{e[('hit', 'host')]}/{e[('load', 'disk')]}", r["load_ms"],
                     ">= 0.95x" if k == "1024" else "", ("met" if ratio >= 0.95 else "MISSED") if k == "1024" else ""])
    return table(f"Issue 4 (ii): {CLIENTS} closed-loop clients, uniform popularity, 32-token prompts, max_tokens 16..48, "
                 f"device cache 16, compiled decode step (best of {reps})",
                 ["adapters", "tokens", "tok/s", "decode tok/s", "tok/s vs 1", "decode vs 1", "hits dev/host/disk loads",
                  "load ms", "target", ""], rows)


def run(quick: bool = False) -> str:
    hf = hf_base()
    loaded = ours_from(hf)
    tmp = tempfile.TemporaryDirectory(prefix="bench-lifecycle-")
    try:
        root = Path(tmp.name)
        sources = {"LoRA r=8 q,v": save_peft_loras(hf, root / "src", 1)["lora0"],
                   "prefix 16 tokens": save_peft_prefix(hf, root / "src-prefix", virtual_tokens=16)}
        short = {"LoRA r=8 q,v": "lora", "prefix 16 tokens": "prefix"}
        out = [upload_latency(root, hf, {short[k]: v for k, v in sources.items()}, 10 if quick else 50)]
        out.append(add_phases(root, loaded, {short[k]: v for k, v in sources.items()}, 5 if quick else 20))
        out.append(registered_throughput(root, loaded, sources["LoRA r=8 q,v"], quick))
        return "\n".join(out)
    finally:
        tmp.cleanup()


def registered_only(quick: bool) -> str:
    """Part (ii) alone: `python -m benchmarks.lifecycle --registered [--quick]`."""
    hf = hf_base()
    with tempfile.TemporaryDirectory(prefix="bench-registered-") as tmp:
        root = Path(tmp)
        return registered_throughput(root, ours_from(hf), save_peft_loras(hf, root / "src", 1)["lora0"], quick)


if __name__ == "__main__":
    import sys

    print(header())
    quick = "--quick" in sys.argv
    print(registered_only(quick) if "--registered" in sys.argv else run(quick=quick))
