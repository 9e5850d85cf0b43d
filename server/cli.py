"""`adapter-server serve [...]` (also `python -m server serve`)."""

from __future__ import annotations

import argparse
import sys
import time
import types
import typing
from typing import Sequence

import uvicorn
from pydantic import ValidationError

from .auth import bind_host
from .middleware import configure_logging
from .settings import ENV_PREFIX, Flag, Settings


def parser() -> argparse.ArgumentParser:
    """`serve`'s flags, one per Settings field (server/settings.py declares them)."""
    p = argparse.ArgumentParser(prog="adapter-server", description="Serve one base model with many adapters.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the HTTP server (flags override ADAPTER_SERVER_* variables)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, field in Settings.model_fields.items():
        flag = next((m for m in field.metadata if isinstance(m, Flag)), Flag())
        target = s if flag.group is None else groups.setdefault(flag.group, s.add_argument_group(flag.group))
        target.add_argument(flag.name or "--" + name.replace("_", "-"), dest=name, default=None,
                            help=help_text(field), **argument_kind(field.annotation, flag))
    return p


def help_text(field) -> str:
    """The field's description, with its default where the description does not say it."""
    text = field.description or ""
    if "default" in text or field.default in (None, (), False) or isinstance(field.default, bool):
        return text
    return f"{text} (default: {field.default})"


def argument_kind(annotation, flag: Flag) -> dict:
    """argparse's type/choices/action for a field's annotation (Optional unwrapped)."""
    if flag.action in ("store_true", "store_false"):
        return {"action": flag.action}
    if flag.action == "append":  # each value is checked by the field's validator
        return {"action": "append", "metavar": flag.metavar}
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation)), "metavar": flag.metavar}
    return {"type": annotation if annotation in (int, float) else str, "metavar": flag.metavar}


def setting_error(error: dict) -> str:
    name = str(error["loc"][0]) if error["loc"] else "?"
    return f"--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}: {error['msg']}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env(**{k: v for k, v in vars(args).items() if k != "command"})
    except ValidationError as e:  # a bad flag value or ADAPTER_SERVER_* variable
        parser().error("; ".join(setting_error(err) for err in e.errors()))
    if settings.demo and settings.model:
        parser().error("--demo registers adapters made for the embedded model; it cannot be combined with --model")
    configure_logging(settings.log_level, settings.log_format)
    settings = bind_host(settings)
    # the app and the cluster are imported once the flags are good: they load torch (and Ray),
    # which `--help` and a flag error do not need
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
