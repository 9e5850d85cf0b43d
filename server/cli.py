"""`adapter-server serve [...]` (also `python -m server serve`)."""

from __future__ import annotations

import argparse
import logging
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
    s.add_argument("--store-dir", dest="store_dir", help="where uploaded adapters are kept (default ./data/adapters)")
    s.add_argument("--adapter-root", dest="adapter_root", help="server-side folders below this may be registered")
    for flag in ("max-upload-bytes", "device-cache-adapters", "device-cache-bytes", "host-cache-bytes",
                 "max-lora-rank", "max-prefix-len"):
        s.add_argument(f"--{flag}", type=int, dest=flag.replace("-", "_"))
    s.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    if overrides.get("adapters"):
        overrides["adapters"] = tuple(overrides["adapters"])
    settings = Settings.from_env(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from .auth import bind_host

    settings = bind_host(settings)

    from .app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
