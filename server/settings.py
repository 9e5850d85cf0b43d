"""Server settings, declared once.

Each field is at the same time
  - the environment variable ADAPTER_SERVER_<FIELD>, parsed to the field's type by
    pydantic-settings (an empty variable counts as unset), and
  - the command-line flag --<field-name> of `adapter-server serve`, generated from the field by
    server/cli.py: its type, its choices (a `Literal`) and its help text (the description).
    A `Flag` in the field's annotation says where the flag differs from that plain form.
Precedence: defaults < environment < flags (`Settings.from_env(**flags)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "ADAPTER_SERVER_"


@dataclass(frozen=True)
class Flag:
    """How a setting's command-line flag differs from the plain `--field-name VALUE`."""

    name: str | None = None  # the flag, when not --field-name
    action: Literal["append", "store_true", "store_false"] | None = None  # repeatable / a switch without value
    metavar: str | None = None
    group: str | None = None  # a titled group in --help


CLUSTER = "scale-out on Ray Serve (pip install 'adapter-server[cluster]')"


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """`NAME=DIR` -> (name, directory)."""
    name, sep, directory = spec.partition("=")
    if not sep or not name.strip() or not directory.strip():
        raise ValueError(f"adapter must be given as NAME=DIR, got {spec!r}")
    return name.strip(), directory.strip()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid")

    # ------------------------------------------------------------------ model and engine
    model: str | None = Field(None, description="local Hugging Face checkpoint directory (default: the embedded tiny "
                                                "model)")
    host: str = Field("127.0.0.1", description="address to listen on (without API keys always 127.0.0.1)")
    port: int = Field(8000, description="port to listen on")
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = Field(
        "float32", description="weights and activations")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    max_batch: int = Field(32, description="KV-cache slots: requests decoded together")
    max_seq_len: int | None = Field(None, description="tokens per request: prefix + prompt + completion (default: the "
                                                      "model's maximum, capped at 4096)")
    max_queue: int = Field(256, description="requests waiting for a slot before the server answers 429")
    token_budget: int = Field(512, description="tokens per engine step, decode rows + prompt chunks (chunked prefill)")
    threads: int | None = Field(None, ge=1, description="torch threads of the engine's math (default: every CPU this "
                                                        "process may use; all other threads run torch single-threaded)")
    compile: Annotated[bool, Flag(name="--no-compile", action="store_false")] = Field(
        True, description="run every engine step eagerly (default: compile the static decode step at startup)")
    adapters: Annotated[tuple[tuple[str, str], ...], NoDecode, Flag(name="--adapter", action="append",
                                                                     metavar="NAME=DIR")] = Field(
        (), description="load an adapter directory at startup (repeatable; the variable: a comma-separated list)")
    demo: Annotated[bool, Flag(action="store_true")] = Field(
        False, description="register the demo adapters (one per method) trained for the embedded model")
    chat_template: Annotated[str | None, Flag(metavar="FILE")] = Field(
        None, description="Jinja chat template for /v1/chat/completions (default: the tokenizer's own)")

    # ------------------------------------------------------------------ keys
    api_key: str | None = Field(None, description="inference key (Authorization: Bearer KEY)")
    admin_key: str | None = Field(None, description="admin key: uploads, deletes, merges (no key at all: localhost "
                                                    "only)")
    metrics_key: str | None = Field(None, description="a key that may read /metrics (the inference and admin keys may "
                                                      "too); with any key set, /metrics needs one")

    # ------------------------------------------------------------------ adapter store and caches
    store_dir: str = Field("./data/adapters", description="where uploaded adapters are kept (created at start)")
    adapter_root: str | None = Field(None, description="server-side folders below this may be registered (default: "
                                                       "none may)")
    max_upload_bytes: int = Field(1 << 30, description="largest adapter upload")
    device_cache_adapters: int = Field(16, description="adapters kept on the device")
    device_cache_bytes: int | None = Field(None, description="bytes of adapters kept on the device (default: no "
                                                             "byte limit)")
    host_cache_bytes: int | None = Field(4 << 30, description="bytes of adapters kept in host memory")
    max_lora_rank: int = Field(256, description="largest LoRA rank accepted")
    max_prefix_len: int = Field(512, description="longest prefix-tuning prefix accepted")

    # ------------------------------------------------------------------ request limits
    max_prompt_tokens: int | None = Field(None, description="per prompt (default: only the context length bounds it)")
    max_prompt_chars: int | None = Field(None, description="per prompt string, checked before tokenizing (default: 8 "
                                                           "x the token limit)")
    max_tokens_limit: int | None = Field(None, description="largest max_tokens a request may ask for (default: no cap)")
    max_body_bytes: int | None = Field(4 << 20, description="JSON request bodies (uploads use max_upload_bytes)")
    max_stack_adapters: int = Field(8, description="adapters in one request's `adapters` stack")
    max_streams_per_key: int | None = Field(64, description="concurrent engine requests per API key (per client host "
                                                            "without keys)")
    shutdown_grace_s: float = Field(10.0, description="on SIGTERM, running requests get this many seconds to finish")

    # ------------------------------------------------------------------ logs
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="text, or one JSON object per line (both carry "
                                                                    "the request id)")

    # ------------------------------------------------------------------ scale-out (server/cluster/)
    replicas: Annotated[int | None, Flag(group=CLUSTER)] = Field(
        None, description="run N engine replicas behind this API on Ray Serve (default: one process, no Ray)")
    max_replicas: Annotated[int | None, Flag(group=CLUSTER)] = Field(
        None, description="autoscale from --replicas up to this many")
    ray_address: Annotated[str | None, Flag(group=CLUSTER)] = Field(
        None, description="join this Ray cluster ('auto': this node's) instead of starting a local instance")
    replica_cpus: Annotated[float, Flag(group=CLUSTER)] = Field(
        1.0, description="CPUs per engine replica (also its torch threads)")
    replica_gpus: Annotated[float | None, Flag(group=CLUSTER)] = Field(
        None, description="GPUs per engine replica (default: 1 where the cluster has GPUs)")
    routing: Annotated[Literal["affinity", "random"], Flag(group=CLUSTER)] = Field(
        "affinity", description="send requests to a replica holding their adapters (default) or anywhere (a baseline)")

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapter_specs(cls, value):
        """"a=/x, b=/y" (the variable) or ["a=/x", ...] (the repeated flag) -> pairs."""
        if isinstance(value, str):
            value = [s for s in value.split(",") if s.strip()]
        return tuple(parse_adapter_spec(v) if isinstance(v, str) else tuple(v) for v in value)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Defaults < ADAPTER_SERVER_<FIELD> variables < `overrides` (those that are not None)."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})
