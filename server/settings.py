"""Server settings: defaults < environment variables `ADAPTER_SERVER_*` < command-line flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping

ENV_PREFIX = "ADAPTER_SERVER_"


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # local HF checkpoint directory; None = the embedded tiny model
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    max_batch: int = 32
    max_seq_len: int | None = None  # None = the model's maximum (capped at 4096)
    max_queue: int = 256
    adapters: tuple[tuple[str, str], ...] = ()  # (name, directory) loaded at startup
    log_level: str = "info"
    api_key: str | None = None  # inference key (completions, models, GET adapters)
    admin_key: str | None = None  # admin key (uploads, deletes, merges); no keys at all = localhost only
    store_dir: str = "./data/adapters"  # uploaded adapters, normalized; created at start
    adapter_root: str | None = None  # server-side folders below this may be registered; None = never
    max_upload_bytes: int = 1 << 30
    device_cache_adapters: int = 16
    device_cache_bytes: int | None = None
    host_cache_bytes: int | None = 4 << 30
    max_lora_rank: int = 256
    max_prefix_len: int = 512
    log_format: str = "text"  # "text" | "json" (one JSON object per line); both carry the request id
    max_prompt_tokens: int | None = None  # per prompt; None = only the context length bounds it
    max_tokens_limit: int | None = None  # largest max_tokens a request may ask for; None = no cap
    max_body_bytes: int | None = 4 << 20  # JSON request bodies (uploads use max_upload_bytes)
    max_stack_adapters: int = 8  # adapters in one request's `adapters` stack
    max_streams_per_key: int | None = 64  # concurrent engine requests per API key (per client host without keys)
    shutdown_grace_s: float = 10.0  # on SIGTERM: running requests get this long to finish
    compile: bool = True  # compile the static decode step at startup (torch.compile); False = eager
    token_budget: int = 512  # tokens per engine step: decode rows + prompt chunks (chunked prefill)
    max_prompt_chars: int | None = None  # per prompt string, checked before tokenizing; None = 8 x the token limit
    metrics_key: str | None = None  # a key for /metrics only; with any key configured /metrics needs one
    # scale-out on Ray Serve (server/cluster/): replicas=None runs the single-process server
    replicas: int | None = None  # engine replicas (the minimum, with max_replicas: autoscaling)
    max_replicas: int | None = None  # autoscale up to this many engine replicas
    ray_address: str | None = None  # join this Ray cluster ("auto": the local node's) instead of starting one
    replica_cpus: float = 1.0  # CPUs per engine replica (also its torch threads)
    replica_gpus: float | None = None  # GPUs per engine replica; None = 1 where the cluster has GPUs
    routing: str = "affinity"  # "affinity" (by adapter set, server/cluster/routing.py) | "random" (uniform, a baseline)
    chat_template: str | None = None  # Jinja chat template file for /v1/chat/completions; None = the tokenizer's
    demo: bool = False  # also register the demo adapters of the embedded model (server/demo_adapters/)

    @staticmethod
    def from_env(environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Settings from `ADAPTER_SERVER_<FIELD>` variables, then `overrides` (non-None) on top.
        ADAPTER_SERVER_ADAPTERS is a comma-separated list of NAME=DIR."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(Settings):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = parse_field(f.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Settings(**values)


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    name, sep, directory = spec.partition("=")
    if not sep or not name.strip() or not directory.strip():
        raise ValueError(f"adapter must be given as NAME=DIR, got {spec!r}")
    return name.strip(), directory.strip()


def parse_field(name: str, raw: str):
    if name in ("port", "max_batch", "max_seq_len", "max_queue", "max_upload_bytes", "device_cache_adapters",
                "device_cache_bytes", "host_cache_bytes", "max_lora_rank", "max_prefix_len", "max_prompt_tokens",
                "max_tokens_limit", "max_body_bytes", "max_stack_adapters", "max_streams_per_key", "max_prompt_chars",
                "replicas", "max_replicas"):
        return int(raw)
    if name in ("shutdown_grace_s", "replica_cpus", "replica_gpus"):
        return float(raw)
    if name == "compile":
        return raw.strip().lower() not in ("0", "false", "no", "off")
    if name == "token_budget":
        return int(raw)
    if name == "demo":
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if name == "adapters":
        return tuple(parse_adapter_spec(s) for s in raw.split(",") if s.strip())
    return raw
