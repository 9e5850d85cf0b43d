"""POST /v1/adapters/average against the `adapters` library's own `average_adapter`.

The sources are made and randomized by the library, stored by our server, and then loaded by
the library back from the store's files (what the store keeps, e.g. prefixes in flat form):
the library averages them with the same arguments, and the adapter our endpoint stored must
give the library's logits (fp32, <= 1e-4) and greedy tokens. Refusals are 400s naming the
problem, and leave the store as it was."""

from __future__ import annotations

import pytest
import torch

adapters_lib = pytest.importorskip("adapters")
peft = pytest.importorskip("peft")
from adapters import (ConfigUnion, DoRAConfig, LoRAConfig, PrefixTuningConfig, SeqBnConfig,  # noqa: E402
                      SeqBnInvConfig)
from fastapi.testclient import TestClient  # noqa: E402

from adapter_runtime.formats import load_adapter  # noqa: E402
from tests.support.packed import forward_sequences  # noqa: E402
from adapter_runtime.models import load_model  # noqa: E402
from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.support.oracles import adapterhub_adapter, greedy_library, peft_adapter  # noqa: E402
from tests.support.tiny import hf_model, random_ids, save_checkpoint  # noqa: E402

TOL = 1e-4
LORA = dict(r=4, alpha=8, attn_matrices=["q", "k", "v"], output_lora=True)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Per family: (test client, our model, checkpoint dir) of an in-process app with a store."""
    out = {}
    with_clients = []
    for kind in ("gpt2", "llama"):
        root = tmp_path_factory.mktemp(f"average-{kind}")
        ckpt = save_checkpoint(hf_model(kind), root / "ckpt")
        # compile=False: nothing here needs the compiled step; its background compile would only
        # compete for the CPU
        app = create_app(Settings(model=str(ckpt), store_dir=str(root / "store"), max_seq_len=64, max_batch=4,
                                  compile=False))
        client = TestClient(app)
        client.__enter__()
        with_clients.append(client)
        out[kind] = (client, load_model(ckpt).model, app)
    yield out
    for client in with_clients:
        client.__exit__(None, None, None)


def add_sources(servers, kind, case, config, n, tmp_path) -> list[str]:
    """n adapters of one config made by the library on one model, stored by our server."""
    _, _, app = servers[kind]
    tmp_path.mkdir(parents=True, exist_ok=True)
    hf = hf_model(kind)
    adapters_lib.init(hf)
    names = []
    for i in range(n):
        directory, hf = adapterhub_adapter(kind, config, tmp_path / f"s{i}", name=f"s{i}", seed=10 + i, hf=hf)
        names.append(f"{case}-{i}")
        app.state.engine.registry.add(names[-1], directory, "adapterhub")
    return names


def library_average(servers, kind, names, **kwargs):
    """The library's average of the stored files, as a model with the average active."""
    _, _, app = servers[kind]
    store = app.state.engine.registry.store
    lib = hf_model(kind)
    adapters_lib.init(lib)
    for name in names:
        lib.load_adapter(str(store.path(name)), load_as=name, use_safetensors=True)
    lib.average_adapter("avg", names, **kwargs)
    lib.set_active_adapters("avg")
    return lib.eval()


CASES = {
    "bottleneck-3": ("gpt2", lambda: SeqBnConfig(reduction_factor=8), 3,
                     dict(weights=[0.2, 0.5, 0.3], combine_strategy="linear")),
    "lora-gpt2-unnormalized": ("gpt2", lambda: LoRAConfig(r=4, alpha=8, intermediate_lora=True), 2,
                               dict(weights=[3.0, -1.0], normalize_weights=False)),
    "lora-svd": ("llama", lambda: LoRAConfig(**LORA), 2,
                 dict(weights=[0.7, -0.4], normalize_weights=False, combine_strategy="lora_delta_w_svd", svd_rank=3)),
    "lora-negate-b": ("llama", lambda: LoRAConfig(**LORA), 2,
                      dict(weights=[0.6, -0.4], normalize_weights=False, combine_strategy="lora_linear_only_negate_b")),
    "union-prefix-nice": ("llama", lambda: ConfigUnion(PrefixTuningConfig(prefix_length=4, bottleneck_size=16),
                                                       SeqBnInvConfig(reduction_factor=8)), 2, {}),
    "dora": ("llama", lambda: DoRAConfig(r=4, alpha=4), 2, dict(weights=[1.0, 2.0])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_average_equals_the_library_average(servers, case, tmp_path):
    kind, config, n, kwargs = CASES[case]
    client, ours, app = servers[kind]
    names = add_sources(servers, kind, case, config(), n, tmp_path)
    r = client.post("/v1/adapters/average", json={"name": f"{case}-avg", "adapters": names, **kwargs})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == f"{case}-avg" and r.json()["format"] == "adapterhub"

    lib = library_average(servers, kind, names, **kwargs)
    ids = random_ids(2, 8, seed=5)
    with torch.no_grad():
        want = lib(ids, use_cache=False).logits
    store = app.state.engine.registry.store
    averaged = load_adapter(store.path(f"{case}-avg"), ours.info)
    first = load_adapter(store.path(names[0]), ours.info)
    got = torch.stack(forward_sequences(ours, ids.tolist(), [(averaged,)] * 2))
    base = torch.stack(forward_sequences(ours, ids.tolist(), [()] * 2))
    single = torch.stack(forward_sequences(ours, ids.tolist(), [(first,)] * 2))
    assert (want - base).abs().max() > 1e-2 and (want - single).abs().max() > 1e-2, "the average must be new"
    assert (got - want).abs().max().item() <= TOL
    if case == "union-prefix-nice":  # the library's average leaves the NICE part out (adapter_runtime/average.py)
        assert first.invertible is not None and averaged.invertible is None and averaged.prefix is not None


def test_average_over_http_generates_like_the_library(servers, tmp_path):
    client, _, _ = servers["llama"]
    names = add_sources(servers, "llama", "greedy", LoRAConfig(**LORA), 2, tmp_path)
    body = {"name": "greedy-avg", "adapters": names, "weights": [0.3, 0.7]}
    assert client.post("/v1/adapters/average", json=body).status_code == 201
    lib = library_average(servers, "llama", names, weights=[0.3, 0.7])
    prompt = random_ids(1, 5, seed=8)[0].tolist()
    r = client.post("/v1/completions", json={"model": "greedy-avg", "prompt": prompt, "max_tokens": 6,
                                             "temperature": 0, "ignore_eos": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    from adapter_runtime.tokenizer import build_byte_tokenizer

    expected = greedy_library(lib, prompt, 6)
    assert tokens == [build_byte_tokenizer().decode([t]) for t in expected]


@pytest.fixture(scope="module")
def refusal_sources(servers, tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    bn = add_sources(servers, "gpt2", "rbn", SeqBnConfig(reduction_factor=8), 2, root / "bn")
    lora = add_sources(servers, "gpt2", "rlora", LoRAConfig(r=4, alpha=8), 1, root / "lora")
    _, _, app = servers["gpt2"]
    directory, _ = peft_adapter("gpt2", peft.LoraConfig(r=2, target_modules=["c_attn"]), root / "peft")
    app.state.engine.registry.add("rpeft", directory, "peft")
    dora = add_sources(servers, "llama", "rdora", DoRAConfig(r=4, alpha=4), 2, root / "dora")
    llama_lora = add_sources(servers, "llama", "rllama", LoRAConfig(r=4, alpha=8), 2, root / "llama")
    return {"bn": bn, "lora": lora, "dora": dora, "llama-lora": llama_lora}


@pytest.mark.parametrize("kind,body,status,words", [
    ("gpt2", {"adapters": ["nope"]}, 400, ["unknown adapter", "nope"]),
    ("gpt2", {"adapters": ["bn0", "bn0"]}, 400, ["twice"]),
    ("gpt2", {"adapters": ["bn0", "rpeft"]}, 400, ["rpeft", "AdapterHub"]),
    ("gpt2", {"adapters": ["bn0", "lora0"]}, 400, ["different configurations"]),
    ("gpt2", {"adapters": ["bn0", "bn1"], "weights": [1.0]}, 400, ["weights has 1 entries"]),
    ("gpt2", {"adapters": ["bn0", "bn1"], "weights": [1.0, -1.0]}, 400, ["sum to 0"]),
    ("gpt2", {"adapters": ["bn0", "bn1"], "combine_strategy": "ties"}, 400, ["ties"]),
    ("gpt2", {"adapters": ["bn0", "bn1"], "combine_strategy": "lora_linear_only_negate_b"}, 400, ["LoRA", "linear"]),
    ("gpt2", {"adapters": ["lora0"], "combine_strategy": "lora_delta_w_svd", "svd_rank": 2}, 400, ["gpt2"]),
    ("gpt2", {"adapters": ["bn0", "bn1"], "svd_rank": 2}, 400, ["svd_rank"]),
    ("gpt2", {"adapters": ["bn0"], "name": "bad/name"}, 400, ["invalid adapter name"]),
    ("gpt2", {"adapters": ["bn0"], "name": "bn1"}, 409, ["already exists"]),
    ("llama", {"adapters": ["dora0", "dora1"], "combine_strategy": "lora_linear_only_negate_b"}, 400, ["'m.weight'"]),
    ("llama", {"adapters": ["dora0", "dora1"], "combine_strategy": "lora_delta_w_svd", "svd_rank": 2}, 400,
     ["plain LoRA"]),
    ("llama", {"adapters": ["ll0", "ll1"], "combine_strategy": "lora_delta_w_svd"}, 400, ["needs svd_rank"]),
    ("llama", {"adapters": ["ll0", "ll1"], "combine_strategy": "lora_delta_w_svd", "svd_rank": 40}, 400,
     ["larger than"]),
])
def test_bad_requests_name_the_problem_and_store_nothing(servers, refusal_sources, kind, body, status, words):
    client, _, app = servers[kind]
    aliases = {"bn0": refusal_sources["bn"][0], "bn1": refusal_sources["bn"][1], "lora0": refusal_sources["lora"][0],
               "dora0": refusal_sources["dora"][0], "dora1": refusal_sources["dora"][1],
               "ll0": refusal_sources["llama-lora"][0], "ll1": refusal_sources["llama-lora"][1]}
    body = {"name": "refused", **body}
    body["adapters"] = [aliases.get(a, a) for a in body["adapters"]]
    body["name"] = aliases.get(body["name"], body["name"])
    store = app.state.engine.registry.store
    before = sorted(p.name for p in store.root.iterdir())
    r = client.post("/v1/adapters/average", json=body)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for w in words:
        assert w.replace("bn1", aliases["bn1"]) in message, message
    assert sorted(p.name for p in store.root.iterdir()) == before
