"""docker/ cannot be built here (no Docker engine): check that the Dockerfile and the compose
file parse, and that every path, setting, build argument and command they name exists."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from server.cli import parser as server_parser
from server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SETTING_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def env_pairs(args: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in shlex.split(args))


def json_or_words(args: str) -> list[str]:
    import json

    return json.loads(args) if args.startswith("[") else shlex.split(args)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKER / "Dockerfile")


def of(dockerfile, kind: str) -> list[str]:
    return [args for k, args in dockerfile if k == kind]


def test_dockerfile_copies_paths_that_exist(dockerfile):
    copies = of(dockerfile, "COPY")
    assert copies
    for args in copies:
        *sources, _dest = [a for a in shlex.split(args) if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository (build context)"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for args in copies:
        for src in shlex.split(args)[:-1]:
            assert f"!{src.rstrip('/')}" in ignore, f"{src} is excluded from the build context"


def test_dockerfile_is_non_root_with_volumes_and_valid_settings(dockerfile):
    users = of(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0")
    volumes = {v for args in of(dockerfile, "VOLUME") for v in json_or_words(args)}
    assert {"/data/adapters", "/model"} <= volumes
    env = {k: v for args in of(dockerfile, "ENV") for k, v in env_pairs(args).items()}
    server_env = {k for k in env if k.startswith(ENV_PREFIX)}
    assert server_env <= SETTING_ENV, f"unknown settings: {server_env - SETTING_ENV}"
    assert env["ADAPTER_SERVER_STORE_DIR"] in volumes and env["ADAPTER_SERVER_HOST"] == "0.0.0.0"
    assert {a.split("=")[0] for a in of(dockerfile, "ARG")} >= {"TORCH_INDEX_URL", "PYTHON_VERSION"}


def test_dockerfile_entrypoint_is_the_server_cli(dockerfile):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = json_or_words(of(dockerfile, "ENTRYPOINT")[-1])
    cmd = json_or_words(of(dockerfile, "CMD")[-1])
    assert entry[0] in scripts and scripts[entry[0]] == "server.cli:main"
    assert server_parser().parse_args(entry[1:] + cmd).command == "serve"
    assert "/health" in of(dockerfile, "HEALTHCHECK")[-1]


def test_dockerfile_torch_requirement_comes_from_pyproject(dockerfile):
    """The RUN step reads torch's pin from pyproject.toml with a Python one-liner: run it here."""
    run = next(args for args in of(dockerfile, "RUN") if "tomllib" in args)
    snippet = re.search(r'python -c "(.+?)"\)', run).group(1)
    import contextlib
    import io
    import os

    out = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out):
            exec(snippet, {})
    finally:
        os.chdir(cwd)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out.getvalue().strip() in deps and out.getvalue().startswith("torch")


def test_compose_file_matches_the_dockerfile(dockerfile):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    volumes = {v for args in of(dockerfile, "VOLUME") for v in json_or_words(args)}
    args = {a.split("=")[0] for a in of(dockerfile, "ARG")}
    services = compose["services"]
    assert {"adapter-server", "adapter-server-cuda"} <= set(services)
    for name, svc in services.items():
        context = (DOCKER / svc["build"]["context"]).resolve()
        assert context == ROOT and (context / svc["build"]["dockerfile"]).is_file()
        assert set(svc["build"].get("args", {})) <= args
        assert set(svc["environment"]) <= SETTING_ENV, f"{name}: unknown settings"
        assert svc["environment"]["ADAPTER_SERVER_MODEL"] == "/model"
        targets = {v.rsplit(":", 2)[1] if v.endswith((":ro", ":rw")) else v.rsplit(":", 1)[1] for v in svc["volumes"]}
        assert targets == {"/model", "/data/adapters"} <= volumes
        assert any(p.endswith(":8000") for p in svc["ports"])
    assert set(compose["volumes"]) == {"adapters"}
    gpu = services["adapter-server-cuda"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["adapter-server-cuda"]["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"
