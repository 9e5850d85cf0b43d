"""Issue 13's acceptance over HTTP: compositions (Fuse, Average, Parallel, BatchSplit, a Stack
around a Fuse) and ReFT (LoReFT, NoReFT, DiReFT), uploaded as the `adapters` 1.3.0 library
saved them and requested through /v1/completions, against the library itself.

The library makes, randomizes and saves every adapter and the fusion layer; the server gets
the files by upload (the fusion refers to its adapters by name); the reference is a fresh
library model that loaded the same files. Each choice's text must be the library's greedy
continuation and each token's log-probability the library's, within 1e-4 (fp32), on GPT-2 and
GQA Llama. The fusion with its adapters then survives a restart of the server on the same
store, and its download loads back into the library with the same outputs.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
import torch
from torch import Tensor

adapters_lib = pytest.importorskip("adapters")
from adapters import DiReftConfig, LoReftConfig, NoReftConfig, SeqBnConfig, SeqBnInvConfig  # noqa: E402
from adapters.composition import Average, BatchSplit, Fuse, Parallel, Stack  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.support.oracles import adapterhub_adapter  # noqa: E402
from tests.support.tiny import decode, hf_model, random_ids, save_checkpoint  # noqa: E402

TOL = 1e-4
STEPS = 5
ADAPTERS = {  # LoReFT first: seed 1 gives it a non-zero projection (torch's orthogonal map of some
    # random `original` matrices is exactly zero, and then the intervention is the identity)
    "loreft": lambda: LoReftConfig(r=4, prefix_positions=2, suffix_positions=2),
    "a": lambda: SeqBnConfig(reduction_factor=8),
    "b": lambda: SeqBnConfig(reduction_factor=16, non_linearity="gelu"),
    "c": lambda: SeqBnConfig(reduction_factor=8, original_ln_before=False, residual_before_ln=False),
    "d": lambda: SeqBnConfig(reduction_factor=4),
    "lang": lambda: SeqBnInvConfig(reduction_factor=8),
    "noreft": lambda: NoReftConfig(r=2, prefix_positions=3, suffix_positions=1, tied_weights=True),
    "direft": lambda: DiReftConfig(r=3, prefix_positions=1, suffix_positions=3),
}
FUSION = Fuse("a", "b", "c", name="fus")

# name -> (our request's `model`, its `adapters`, the library's active setup, prompts, channels)
CASES = {
    "fuse": ("base", {"fuse": ["a", "b", "c"]}, lambda: FUSION, 1, 1),
    "fuse-by-name": ("fus", None, lambda: FUSION, 1, 1),
    "stack-lang-fuse": ("base", ["lang", "fus"], lambda: Stack("lang", FUSION), 1, 1),
    "average": ("base", {"average": ["a", "b", "c"], "weights": [0.2, 0.5, 1.3]},
                lambda: Average("a", "b", "c", weights=[0.2, 0.5, 1.3]), 1, 1),
    "parallel-of-4": ("base", {"parallel": ["a", "b", "c", "d"]}, lambda: Parallel("a", "b", "c", "d"), 1, 4),
    "batch-split": ("base", {"batch_split": ["a", "c"], "batch_sizes": [1, 1]},
                    lambda: BatchSplit("a", "c", batch_sizes=[1, 1]), 2, 1),
    "loreft": ("loreft", None, lambda: "loreft", 1, 1),
    "noreft": ("noreft", None, lambda: "noreft", 1, 1),
    "direft": ("direft", None, lambda: "direft", 1, 1),
}


def upload(client: TestClient, name: str, directory: Path) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir()) if p.is_file()]
    r = client.post("/v1/adapters", params={"name": name}, files=files)
    assert r.status_code == 201, r.text


def library_files(kind: str, root: Path) -> dict[str, Path]:
    """Every adapter and the fusion, made, randomized and saved by the library."""
    hf = hf_model(kind)
    adapters_lib.init(hf)
    dirs = {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        dirs[name], hf = adapterhub_adapter(kind, config(), root / name, name=name, seed=i + 1,
                                            scale=2.0 if name == "loreft" else 0.5, hf=hf)
    hf.add_adapter_fusion(FUSION, config="dynamic")
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if re.search(r"adapter_fusion_layer\.fus\.", pname):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    dirs["fus"] = root / "fus"
    dirs["fus"].mkdir()
    hf.save_adapter_fusion(str(dirs["fus"]), "fus")
    return dirs


def library_model(kind: str, dirs: dict[str, Path]):
    """A fresh library model that loaded the saved files back (what a server sees)."""
    lib = hf_model(kind)
    adapters_lib.init(lib)
    for name in ADAPTERS:
        lib.load_adapter(str(dirs[name]), load_as=name)
    lib.load_adapter_fusion(str(dirs["fus"]), load_as="fus")
    return lib.eval()


def library_greedy(lib, setup, prompts: list[list[int]], channels: int) -> list[tuple[list[int], list[float], Tensor]]:
    """Per output row (channel-major, as the library orders Parallel's rows): the library's
    greedy tokens, their log-probabilities and every step's log-probabilities [STEPS, V], from
    full uncached forwards (reference §5.11)."""
    B = len(prompts)
    rows = [list(p) for _ in range(channels) for p in prompts]
    logprobs: list[list[float]] = [[] for _ in rows]
    dists: list[list[Tensor]] = [[] for _ in rows]
    lib.set_active_adapters(setup)
    try:
        with torch.no_grad():
            for _ in range(STEPS):
                for c in range(channels):
                    out = lib(torch.tensor(rows[c * B:(c + 1) * B]), use_cache=False).logits[:, -1]  # [C*B or B, V]
                    mine = out[c * B:(c + 1) * B] if out.shape[0] > B else out
                    for p, logits in enumerate(torch.log_softmax(mine.double(), -1)):
                        token = int(logits.argmax())
                        rows[c * B + p].append(token)
                        logprobs[c * B + p].append(float(logits[token]))
                        dists[c * B + p].append(logits)
    finally:
        lib.set_active_adapters(None)
    return [(row[len(prompts[i % B]):], logprobs[i], torch.stack(dists[i])) for i, row in enumerate(rows)]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def world(request, tmp_path_factory):
    """(kind, client, app factory, the library model, the saved directories)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"compose-http-{kind}")
    ckpt = save_checkpoint(hf_model(kind), root / "base")
    (root / "saved").mkdir()
    dirs = library_files(kind, root / "saved")
    settings = Settings(model=str(ckpt), store_dir=str(root / "store"), max_seq_len=64, max_batch=8, compile=False)
    with TestClient(create_app(settings)) as client:
        for name in [*ADAPTERS, "fus"]:  # the fusion after the adapters it fuses
            upload(client, name, dirs[name])
        yield kind, client, settings, library_model(kind, dirs), dirs


def complete(client: TestClient, model: str, adapters, prompts: list[list[int]]) -> list[dict]:
    body = {"model": model, "prompt": prompts, "max_tokens": STEPS, "temperature": 0, "logprobs": 0,
            "ignore_eos": True}
    if adapters is not None:
        body["adapters"] = adapters
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"]


def check_case(client, lib, case: str, base_name: str) -> None:
    model, adapters, setup, n_prompts, channels = CASES[case]
    prompts = random_ids(n_prompts, 6, seed=7).tolist()
    choices = complete(client, base_name if model == "base" else model, adapters, prompts)
    expected = library_greedy(lib, setup(), prompts, channels)
    base = library_greedy(lib, None, prompts, 1)
    assert len(choices) == n_prompts * channels
    for p in range(n_prompts):
        for c in range(channels):
            choice, (ids, logprobs, dist) = choices[p * channels + c], expected[c * n_prompts + p]  # ours: prompt-major
            assert ids != base[p][0] or (dist - base[p][2]).abs().max() > 1e-2, \
                "the composition has no effect: the comparison proves nothing"
            assert choice["text"] == decode(ids), (p, c)
            got = choice["logprobs"]["token_logprobs"]
            assert len(got) == STEPS and max(abs(a - b) for a, b in zip(got, logprobs)) <= TOL, (p, c, got, logprobs)


@pytest.mark.parametrize("case", list(CASES))
def test_composition_over_http_equals_the_library(world, case):
    kind, client, _, lib, _ = world
    base_name = client.get("/v1/models").json()["data"][0]["id"]
    check_case(client, lib, case, base_name)


def test_mixed_compositions_in_one_batch_equal_each_alone(world):
    """Concurrent requests of every case (and the base model) share engine steps; each gives
    what it gives alone."""
    import concurrent.futures

    _, client, _, _, _ = world
    base_name = client.get("/v1/models").json()["data"][0]["id"]
    prompts = random_ids(2, 6, seed=11).tolist()

    requests = {case: (model, adapters, n) for case, (model, adapters, _, n, _) in CASES.items()}
    requests["base"] = ("base", None, 1)

    def run(case):
        model, adapters, n_prompts = requests[case]
        return [c["text"] for c in complete(client, base_name if model == "base" else model, adapters,
                                            prompts[:n_prompts])]

    alone = {case: run(case) for case in requests}
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = dict(zip(requests, pool.map(run, requests)))
    assert together == alone


def test_fusion_survives_restart_and_its_download_loads_in_the_library(world, tmp_path):
    kind, client, settings, lib, _ = world
    r = client.get("/v1/adapters/fus/files")
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        z.extractall(tmp_path / "fus")
    downloaded = hf_model(kind)
    adapters_lib.init(downloaded)
    for name in ("a", "b", "c"):
        downloaded.load_adapter(str(lib_dir(world, name)), load_as=name)
    downloaded.load_adapter_fusion(str(tmp_path / "fus"), load_as="fus", use_safetensors=True)
    ids = random_ids(2, 6, seed=5)
    for model in (downloaded, lib):
        model.set_active_adapters(FUSION)
    try:
        with torch.no_grad():
            assert torch.equal(downloaded.eval()(ids, use_cache=False).logits, lib(ids, use_cache=False).logits)
    finally:
        lib.set_active_adapters(None)
    with TestClient(create_app(settings)) as restarted:  # the same store, a new process state
        listed = {a["id"] for a in restarted.get("/v1/adapters").json()["data"]}
        assert {"a", "b", "c", "fus"} <= listed
        base_name = restarted.get("/v1/models").json()["data"][0]["id"]
        check_case(restarted, lib, "stack-lang-fuse", base_name)


def lib_dir(world, name: str) -> Path:
    return world[4][name]


REFUSED = {
    "fuse of a ReFT": ({"fuse": ["a", "loreft"]}, "bottleneck"),
    "unknown adapter": ({"parallel": ["a", "nope"]}, "nope"),
    "average weights": ({"average": ["a", "b"], "weights": [1, -1]}, "sum to 0"),
    "nesting": ({"stack": ["a", {"stack": ["b", "c"]}]}, "Stack cannot hold Stack"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_compositions_are_4xx_naming_the_problem(world, case):
    _, client, _, _, _ = world
    adapters, message = REFUSED[case]
    before = client.get("/v1/adapters").json()
    base_name = client.get("/v1/models").json()["data"][0]["id"]
    r = client.post("/v1/completions", json={"model": base_name, "prompt": [1, 2, 3], "max_tokens": 2,
                                              "adapters": adapters})
    assert 400 <= r.status_code < 500 and message in r.text, (r.status_code, r.text)
    assert client.get("/v1/adapters").json() == before


def test_a_nameless_fuse_reads_no_fusion_weights_and_two_candidates_are_a_400(world):
    """The fusion for {"fuse": [...]} is found from the stored configs: a candidate that does
    not run is not loaded; two fusions of the same adapters make the request ambiguous."""
    _, client, _, _, dirs = world
    upload(client, "fus-copy", dirs["fus"])
    try:
        where = client.get("/v1/adapters/fus-copy").json()["location"]
        assert where != "device"  # uploaded: read once, on the host
        base_name = client.get("/v1/models").json()["data"][0]["id"]
        r = client.post("/v1/completions", json={"model": base_name, "prompt": [1, 2, 3], "max_tokens": 1,
                                                  "adapters": {"fuse": ["a", "b", "c"]}})
        assert r.status_code == 400 and "several fusions" in r.text and "fus-copy" in r.text, r.text
        assert client.get("/v1/adapters/fus-copy").json()["location"] == where  # not loaded by the lookup
        r = client.post("/v1/completions", json={"model": base_name, "prompt": [1, 2, 3], "max_tokens": 1,
                                                  "adapters": {"fuse": ["a", "b", "c"], "name": "fus"}})
        assert r.status_code == 200, r.text
    finally:
        assert client.delete("/v1/adapters/fus-copy").status_code == 200
