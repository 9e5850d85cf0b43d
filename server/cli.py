"""`adapter-server serve [...]` (also `python -m server serve`)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .settings import Settings, parse_adapter_spec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapter-server", description="Serve one base model with many adapters.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the HTTP server (flags override ADAPTER_SERVER_* variables)")
    s.add_argument("--model", help="local Hugging Face checkpoint directory (default: the embedded tiny model)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--max-batch", type=int, dest="max_batch")
    s.add_argument("--max-seq-len", type=int, dest="max_seq_len")
    s.add_argument("--max-queue", type=int, dest="max_queue")
    s.add_argument("--adapter", action="append", type=parse_adapter_spec, dest="adapters", metavar="NAME=DIR",
                   help="load an adapter directory at startup (repeatable)")
    s.add_argument("--api-key", dest="api_key", help="inference key (Authorization: Bearer KEY)")
    s.add_argument("--admin-key", dest="admin_key", help="admin key: uploads, deletes, merges")
    s.add_argument("--metrics-key", dest="metrics_key",
                   help="a key that may read /metrics (the inference and admin keys may too); with any key set, "
                        "/metrics needs one")
    s.add_argument("--store-dir", dest="store_dir", help="where uploaded adapters are kept (default ./data/adapters)")
    s.add_argument("--adapter-root", dest="adapter_root", help="server-side folders below this may be registered")
    for flag in ("max-upload-bytes", "device-cache-adapters", "device-cache-bytes", "host-cache-bytes",
                 "max-lora-rank", "max-prefix-len", "max-prompt-tokens", "max-tokens-limit", "max-body-bytes",
                 "max-stack-adapters", "max-streams-per-key", "max-prompt-chars"):
        s.add_argument(f"--{flag}", type=int, dest=flag.replace("-", "_"))
    s.add_argument("--shutdown-grace-s", type=float, dest="shutdown_grace_s",
                   help="on SIGTERM, running requests get this many seconds to finish (default 10)")
    s.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                   help="run every engine step eagerly (default: compile the static decode step at startup)")
    s.add_argument("--token-budget", type=int, dest="token_budget",
                   help="tokens per engine step, decode rows + prompt chunks (default 512)")
    c = s.add_argument_group("scale-out on Ray Serve (pip install 'adapter-server[cluster]')")
    c.add_argument("--replicas", type=int, help="run N engine replicas behind this API on Ray Serve")
    c.add_argument("--max-replicas", type=int, dest="max_replicas", help="autoscale from --replicas up to this many")
    c.add_argument("--ray-address", dest="ray_address", help="join this Ray cluster ('auto': this node's) "
                   "instead of starting a local instance")
    c.add_argument("--replica-cpus", type=float, dest="replica_cpus", help="CPUs per engine replica (default 1)")
    c.add_argument("--replica-gpus", type=float, dest="replica_gpus", help="GPUs per engine replica "
                   "(default: 1 where the cluster has GPUs)")
    c.add_argument("--routing", choices=["affinity", "random"], help="send requests to a replica holding "
                   "their adapters (default) or anywhere")
    s.add_argument("--chat-template", dest="chat_template", metavar="FILE",
                   help="Jinja chat template for /v1/chat/completions (default: the tokenizer's own)")
    s.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", dest="log_format", choices=["text", "json"])
    s.add_argument("--demo", action="store_true", default=None,
                   help="register the demo adapters (one per method) trained for the embedded model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    if overrides.get("adapters"):
        overrides["adapters"] = tuple(overrides["adapters"])
    settings = Settings.from_env(**overrides)
    if settings.demo and settings.model:
        parser().error("--demo registers adapters made for the embedded model; it cannot be combined with --model")
    from .middleware import configure_logging

    configure_logging(settings.log_level, settings.log_format)

    from .auth import bind_host

    settings = bind_host(settings)

    if settings.replicas is not None or settings.ray_address or settings.max_replicas:
        from . import cluster

        return cluster.run(settings)

    from .app import create_app

    run_server(create_app(settings), settings)
    return 0


def run_server(app, settings: Settings) -> None:
    """uvicorn, with a shutdown that drains: on SIGTERM/SIGINT the engine stops admitting at
    once and gives running requests `shutdown_grace_s` to finish (then fails them with a clear
    error). Meanwhile the server still accepts connections and answers new requests (and
    /health) with 503, so load balancers see "draining", not "connection refused"; once the
    engine is idle it stops listening, waits for the last responses, and exits 0. A second
    signal stops at once."""
    import time

    import uvicorn

    class DrainingServer(uvicorn.Server):
        drain_until: float | None = None  # set by the first signal

        def handle_exit(self, sig, frame) -> None:
            engine = getattr(app.state, "engine", None)
            if self.drain_until is not None or self.should_exit or engine is None:
                self.force_exit = self.drain_until is not None or self.should_exit  # a second signal: stop now
                self.should_exit = True  # not recorded: uvicorn would re-raise it and exit non-zero
                return
            engine.drain(settings.shutdown_grace_s)
            self.drain_until = time.monotonic() + settings.shutdown_grace_s + 1.0

        async def on_tick(self, counter: int) -> bool:
            if self.drain_until is not None and not self.should_exit:
                engine = getattr(app.state, "engine", None)
                if engine is None or not engine.busy or time.monotonic() > self.drain_until:
                    self.should_exit = True  # stop listening; responses under way still finish
            return await super().on_tick(counter)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=None, access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s + 5)
    DrainingServer(config).run()


if __name__ == "__main__":
    sys.exit(main())
