"""`adapter-client`: drive an adapter-server from the shell (also `python -m clients.cli`).

Tables for people by default, `--json` for scripts. Exit codes (stable, for scripts):
0 ok, 1 server error (5xx or other), 2 usage or request refused by the server (400/413/422),
3 not found, 4 conflict, 5 authentication, 6 cannot connect.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any, Callable, Sequence, TextIO

from rich import filesize
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn)
from rich.table import Column
from rich.text import Text

from .client import (ADMIN_KEY_ENV, API_KEY_ENV, DEFAULT_URL, URL_ENV, AdapterInfo, AdapterServerClient, AdapterServerError,
                     AuthError, BadRequest, Conflict, ConnectionFailed, Health, NotFound)

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_AUTH, EXIT_CONNECTION = range(7)

EXIT_BY_ERROR: list[tuple[type[AdapterServerError], int]] = [
    (ConnectionFailed, EXIT_CONNECTION), (AuthError, EXIT_AUTH), (NotFound, EXIT_NOT_FOUND),
    (Conflict, EXIT_CONFLICT), (BadRequest, EXIT_USAGE),
]


def exit_code(error: AdapterServerError) -> int:
    for cls, code in EXIT_BY_ERROR:
        if isinstance(error, cls):
            return code
    return EXIT_SERVER


# ---------------------------------------------------------------------------- output
def to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def print_json(value: Any, out: TextIO) -> None:
    print(json.dumps(to_json(value), indent=2), file=out)


def human_bytes(n: int | float) -> str:
    """Binary units, labelled as such: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def adapter_row(a: AdapterInfo) -> list[Any]:
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    return [a.id, a.format, a.method, f"{a.parameters:,}", human_bytes(a.bytes), a.location or "-", yes(a.merged),
            yes(a.pinned), a.requests_served]


ADAPTER_HEADER = ["NAME", "FORMAT", "METHOD", "PARAMS", "SIZE", "TIER", "MERGED", "PINNED", "SERVED"]


def adapter_details(a: AdapterInfo) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.created)) if a.created else "-"
    pairs = [("name", a.id), ("format", a.format), ("method", a.method), ("parameters", f"{a.parameters:,}"),
             ("size", human_bytes(a.bytes)), ("location", a.location or "-"), ("merged", a.merged),
             ("pinned", a.pinned), ("requests served", a.requests_served), ("created", created)]
    pairs += sorted(a.extra.items())
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in pairs)


def health_rows(h: Health) -> list[list[Any]]:
    """(field, value) rows of /health: nested groups flattened ("adapters: device bytes"), byte
    counts in binary units."""
    rows: list[list[Any]] = [["status", h.status], ["model", h.model]]

    def add(prefix: str, values: dict) -> None:
        for key, value in values.items():
            label = f"{prefix}{key.replace('_', ' ')}"
            if isinstance(value, dict):
                add(f"{label}: ", value)
            else:
                rows.append([label, human_bytes(value) if key.endswith("bytes") and isinstance(value, int) else value])

    add("", h.stats)
    return rows


class BinarySpeedColumn(ProgressColumn):
    """Transfer speed in binary units (MiB/s), like DownloadColumn(binary_units=True)."""

    def render(self, task) -> Text:
        if not task.speed:
            return Text("", style="progress.data.speed")
        unit, suffix = filesize.pick_unit_and_suffix(int(task.speed), ["B", "KiB", "MiB", "GiB"], 1024)
        return Text(f"{task.speed / unit:.1f} {suffix}/s", style="progress.data.speed")


class UploadProgress:
    """Progress of an upload on stderr. On a terminal: one live line drawn by rich, fitted to
    the terminal's width (the label is shortened first, the bar takes what is left). Not on a
    terminal: nothing while it runs, one plain summary line at the end. Call it as
    `progress(sent, total)`."""

    def __init__(self, name: str, console: Console | None = None):
        self.name = name
        self.console = console or Console(stderr=True)
        self.sent = self.total = 0
        self.started = time.monotonic()
        self.live: Progress | None = None
        if self.console.is_terminal:
            self.live = Progress(*self.columns(self.console.width), console=self.console, expand=True)
            self.task = self.live.add_task(name, total=None)

    @staticmethod
    def columns(width: int) -> list[ProgressColumn]:
        """Label, bar, percentage; sizes, speed and time left when the terminal has room. Every
        column stays on one line; the label gives way first (ellipsis), then the bar."""
        fixed = lambda: Column(no_wrap=True)  # noqa: E731
        label = TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                      max_width=max(8, width // 3)))
        columns: list[ProgressColumn] = [label, BarColumn(bar_width=None, table_column=Column(ratio=1, no_wrap=True)),
                                         TaskProgressColumn(table_column=fixed())]
        if width >= 72:
            columns += [DownloadColumn(binary_units=True, table_column=fixed()), BinarySpeedColumn(table_column=fixed()),
                        TimeRemainingColumn(table_column=fixed())]
        return columns

    def __call__(self, sent: int, total: int) -> None:
        self.sent, self.total = sent, total
        if self.live is not None:
            if not self.live.live.is_started:  # drawn from the first byte on: nothing if the upload never starts
                self.live.start()
            self.live.update(self.task, completed=sent, total=total)

    def __enter__(self) -> "UploadProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.live is not None:
            if self.live.live.is_started:
                self.live.stop()
        elif exc_type is None:
            seconds = time.monotonic() - self.started
            self.console.print(f"uploaded {self.name}: {human_bytes(self.sent)} in {seconds:.1f} s", highlight=False,
                               soft_wrap=True)


# ---------------------------------------------------------------------------- commands
Command = Callable[[AdapterServerClient, argparse.Namespace, TextIO], int]


def cmd_health(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    h = client.health()
    if args.json:
        print_json(h, out)
    else:
        print(table(["FIELD", "VALUE"], health_rows(h)), file=out)
    return EXIT_OK


def cmd_models(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    models = client.models()
    if args.json:
        print_json(models, out)
    else:
        print(table(["ID", "PARENT"], [[m.id, m.parent or "-"] for m in models]), file=out)
    return EXIT_OK


def show_adapter(info: AdapterInfo, args: argparse.Namespace, out: TextIO) -> int:
    if args.json:
        print_json(info, out)
    else:
        print(adapter_details(info), file=out)
    return EXIT_OK


def cmd_upload(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    show_bar = sys.stderr.isatty() if args.progress is None else args.progress
    if not show_bar:
        return show_adapter(client.upload_adapter(args.name, args.path, args.format), args, out)
    with UploadProgress(args.name) as progress:
        info = client.upload_adapter(args.name, args.path, args.format, progress=progress)
    return show_adapter(info, args, out)


def cmd_register(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    return show_adapter(client.register_adapter(args.name, args.path, args.format), args, out)


def cmd_list(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    adapters = client.list_adapters()
    if args.json:
        print_json(adapters, out)
    else:
        print(table(ADAPTER_HEADER, [adapter_row(a) for a in adapters]), file=out)
    return EXIT_OK


def cmd_show(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    return show_adapter(client.get_adapter(args.name), args, out)


def cmd_download(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    dest = client.download_adapter(args.name, args.dest)
    print(json.dumps({"id": args.name, "path": str(dest)}) if args.json else f"saved {args.name} to {dest}", file=out)
    return EXIT_OK


def cmd_delete(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    d = client.delete_adapter(args.name)
    print(json.dumps(to_json(d)) if args.json else f"deleted {d.id}", file=out)
    return EXIT_OK


def completion_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "seed": args.seed, "stop": args.stop or None, "logprobs": args.logprobs, "echo": args.echo or None}


def cmd_complete(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    params = completion_params(args)
    if args.stream:
        for chunk in client.stream(args.prompt, args.model, args.adapter, **params):
            if args.json:
                print(json.dumps(to_json(chunk)), file=out, flush=True)  # one JSON object per line
            else:
                out.write(chunk.text)
                out.flush()
        if not args.json:
            out.write("\n")
        return EXIT_OK
    completion = client.complete(args.prompt, args.model, args.adapter, **params)
    if args.json:
        print_json(completion, out)
    else:
        print(completion.text, file=out)
    return EXIT_OK


def print_merge_state(merged: str | None, args: argparse.Namespace, out: TextIO) -> int:
    print(json.dumps({"merged": merged}) if args.json else f"merged: {merged or 'none'}", file=out)
    return EXIT_OK


def cmd_merge(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    state = client.merge(args.name) if args.name else client.merged()
    return print_merge_state(state.merged, args, out)


def cmd_reset(client: AdapterServerClient, args: argparse.Namespace, out: TextIO) -> int:
    return print_merge_state(client.reset().merged, args, out)


# ---------------------------------------------------------------------------- parser
def common_options(subcommand: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command. A subcommand's copy has no defaults, so
    that it does not overwrite a value given before the command."""
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS if subcommand else None)
    common.add_argument("--url", help=f"server URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    common.add_argument("--api-key", help=f"inference key (default: ${API_KEY_ENV})")
    common.add_argument("--admin-key", help=f"admin key, sent by admin commands (default: ${ADMIN_KEY_ENV})")
    common.add_argument("--timeout", type=float, help="seconds to wait for the server (default 300)")
    common.add_argument("--json", action="store_true", help="print JSON instead of tables",
                        **({"default": argparse.SUPPRESS} if subcommand else {}))
    return common


def parser() -> argparse.ArgumentParser:
    common = common_options(subcommand=True)
    p = argparse.ArgumentParser(prog="adapter-client", parents=[common_options(subcommand=False)],
                                description="Upload, list, merge and run adapters on an adapter-server.",
                                epilog="exit codes: 0 ok, 1 server error, 2 usage or request refused by the server "
                                       "(400/413/422), 3 not found, 4 conflict, 5 authentication, 6 cannot connect")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, parents=[common], help=help, description=help)
        s.set_defaults(func=func)
        return s

    add("health", cmd_health, "server status")
    add("models", cmd_models, "the base model and the adapters, as OpenAI models")

    s = add("upload", cmd_upload, "upload an AdapterHub or PEFT adapter directory (or a .zip/.tar.gz of one)")
    s.add_argument("name")
    s.add_argument("path")
    s.add_argument("--format", choices=["adapterhub", "peft"], help="default: detected by the server")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr: a bar on a terminal, else one summary line (default: on a terminal)")

    s = add("register", cmd_register, "add an adapter from a directory on the server's file system")
    s.add_argument("name")
    s.add_argument("path")
    s.add_argument("--format", choices=["adapterhub", "peft"])

    add("list", cmd_list, "list adapters")
    add("show", cmd_show, "one adapter's details").add_argument("name")
    s = add("download", cmd_download, "fetch an adapter's files into a directory")
    s.add_argument("name")
    s.add_argument("dest")
    add("delete", cmd_delete, "delete an adapter").add_argument("name")

    s = add("complete", cmd_complete, "complete a prompt")
    s.add_argument("prompt")
    s.add_argument("--model", "-m", help="the base model or an adapter name (default: the base model)")
    s.add_argument("--adapter", "-a", action="append", help="an adapter to apply; repeat to stack them in order")
    s.add_argument("--max-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", help="a stop string (repeatable)")
    s.add_argument("--logprobs", type=int)
    s.add_argument("--echo", action="store_true", help="include the prompt in the output")
    s.add_argument("--stream", action="store_true", help="print the text as it is generated")

    s = add("merge", cmd_merge, "merge an adapter into the base weights (no name: show what is merged)")
    s.add_argument("name", nargs="?")
    add("reset", cmd_reset, "unmerge: restore the original base weights")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)  # exits 2 on a usage error
    try:
        with AdapterServerClient(args.url, args.api_key, args.timeout, admin_key=args.admin_key) as client:
            return args.func(client, args, sys.stdout)
    except AdapterServerError as e:
        where = f" ({e.status}{', ' + str(e.code) if e.code else ''})" if e.status else ""
        print(f"adapter-client: error{where}: {e.message}", file=sys.stderr)
        return exit_code(e)
    except (OSError, ValueError) as e:  # a local path or argument problem
        print(f"adapter-client: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
