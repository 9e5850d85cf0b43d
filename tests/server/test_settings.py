"""Settings are declared once (server/settings.py): every field is an ADAPTER_SERVER_<FIELD>
variable parsed to its type and a generated `serve` flag; flags beat variables beat defaults;
the engine's configuration is taken from them by name."""

from __future__ import annotations

import types
import typing
from dataclasses import fields

import pytest

from adapter_runtime.engine import EngineConfig
from server.app import engine_config
from server.cli import main, parser
from server.settings import ENV_PREFIX, Settings


def flags(*argv: str) -> Settings:
    """The settings `adapter-server serve ARGV` would run with (as server.cli.main builds them)."""
    args = parser().parse_args(["serve", *argv])
    return Settings.from_env(**{k: v for k, v in vars(args).items() if k != "command"})


def example(annotation) -> tuple[str, object]:
    """A value other than the default for a field of this type: (as text, as parsed)."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kind = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
    if typing.get_origin(kind) is typing.Literal:
        value = typing.get_args(kind)[-1]
        return value, value
    return {int: ("7", 7), float: ("2.5", 2.5), bool: ("false", False), str: ("text", "text")}[kind]


PLAIN = [name for name, f in Settings.model_fields.items() if name not in ("adapters", "compile", "demo")]


@pytest.mark.parametrize("name", PLAIN)
def test_every_setting_is_a_typed_variable_and_a_flag(name, monkeypatch):
    """Before, a setting left out of a hand-kept list stayed a string when it came from the
    environment; now the field's type parses it, flag and variable alike."""
    raw, value = example(Settings.model_fields[name].annotation)
    monkeypatch.setenv(ENV_PREFIX + name.upper(), raw)
    assert getattr(Settings.from_env(), name) == value
    monkeypatch.delenv(ENV_PREFIX + name.upper())
    assert getattr(flags(f"--{name.replace('_', '-')}", raw), name) == value


def test_the_special_flags_and_their_variables(monkeypatch):
    assert flags("--adapter", "a=/x", "--adapter", "b=/y").adapters == (("a", "/x"), ("b", "/y"))
    assert flags("--no-compile").compile is False and flags().compile is True
    assert flags("--demo").demo is True and flags().demo is False
    monkeypatch.setenv("ADAPTER_SERVER_ADAPTERS", "a=/x, b=/y")
    monkeypatch.setenv("ADAPTER_SERVER_COMPILE", "0")
    monkeypatch.setenv("ADAPTER_SERVER_DEMO", "yes")
    s = Settings.from_env()
    assert (s.adapters, s.compile, s.demo) == ((("a", "/x"), ("b", "/y")), False, True)


def test_flags_beat_variables_beat_defaults(monkeypatch):
    monkeypatch.setenv("ADAPTER_SERVER_PORT", "9001")
    monkeypatch.setenv("ADAPTER_SERVER_MAX_BATCH", "8")
    monkeypatch.setenv("ADAPTER_SERVER_API_KEY", "")  # empty = unset
    s = flags("--port", "9002")
    assert (s.port, s.max_batch, s.api_key, s.max_queue) == (9002, 8, None, 256)


def test_a_bad_value_names_the_flag_and_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("ADAPTER_SERVER_MAX_BATCH", "many")
    with pytest.raises(SystemExit):
        main(["serve"])
    assert "--max-batch / ADAPTER_SERVER_MAX_BATCH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--adapter", "no-equals-sign"])
    assert "NAME=DIR" in capsys.readouterr().err


def test_help_comes_from_the_field_descriptions(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert Settings.model_fields["token_budget"].description in text and "(default: 512)" in text


def test_the_engine_config_is_taken_by_name():
    s = Settings(max_batch=3, max_seq_len=40, max_queue=5, token_budget=64, compile=False, device_cache_adapters=7)
    config = engine_config(s)
    shared = [f.name for f in fields(EngineConfig) if f.name in Settings.model_fields]
    assert sorted(shared) == ["compile", "max_batch", "max_queue", "max_seq_len", "threads", "token_budget"]
    assert [getattr(config, n) for n in shared] == [getattr(s, n) for n in shared] and config.bank_slots == 7


def test_the_client_variables_are_not_the_servers(monkeypatch):
    monkeypatch.setenv("ADAPTER_CLIENT_ADMIN_KEY", "admin")
    assert Settings.from_env().api_key is None and Settings.from_env().admin_key is None
