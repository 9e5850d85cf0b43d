"""Every adapter type the server serves, made and randomized by its own library (PEFT, AdapterHub
`adapters`) and run by it alone for the reference outputs; and the ways of uploading one.
Shared by the single-process store tests and the cluster tests."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import httpx
import torch
from adapters import CompacterConfig, IA3Config as AhIA3, LoRAConfig as AhLoRA
from adapters import PrefixTuningConfig as AhPrefix, SeqBnConfig, SeqBnInvConfig
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from tests.support.tiny import hf_model

ADMIN, INFER = "admin-secret", "infer-secret"
PROMPT = [5, 17, 99, 230, 42]
STEPS = 5
LORA_SETS = 8  # distinct weight sets behind the 1,000 cheap adapters


def argmax_loop(model, steps: int = STEPS, **kwargs) -> list[int]:
    """The library's greedy output for PROMPT (full forwards)."""
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids, **kwargs).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(PROMPT):].tolist()


def randomize(params, seed: int, ia3: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.5 * noise if ia3 else 0.3 * noise)


def save_peft_adapter(config, directory: Path, seed: int, ia3: bool = False, safe: bool = True) -> list[int]:
    model = get_peft_model(hf_model("llama"), config)
    randomize([p for p in model.parameters() if p.requires_grad], seed, ia3)
    model.eval().save_pretrained(directory, safe_serialization=safe)
    return argmax_loop(model)


def adapterhub_adapters(root: Path) -> dict[str, list[int]]:
    """Every AdapterHub family on one model, each saved (as .bin) and run alone."""
    import adapters as ah

    configs = {"ah-seqbn": SeqBnConfig(), "ah-compacter": CompacterConfig(reduction_factor=8), "ah-inv": SeqBnInvConfig(),
               "ah-prefix": AhPrefix(prefix_length=6, bottleneck_size=32), "ah-lora": AhLoRA(r=4, alpha=8),
               "ah-ia3": AhIA3()}
    hf = hf_model("llama")
    ah.init(hf)
    refs = {}
    for i, (name, config) in enumerate(configs.items()):
        hf.add_adapter(name, config=config)
        randomize([p for n, p in hf.named_parameters() if f".{name}." in n + "."], 10 + i, ia3=False)
        hf.set_active_adapters(name)
        refs[name] = argmax_loop(hf, use_cache=False)  # the library's Llama cache is broken
        hf.save_adapter(str(root / name), name)
    return refs


def make_every_type(root: Path) -> tuple[Path, dict[str, list[int]]]:
    """(root, {name: reference token ids}): under `root` one saved directory per adapter type,
    plus the LoRA sets."""
    refs = {
        "peft-lora": save_peft_adapter(LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                             target_modules=["q_proj", "v_proj", "down_proj"]), root / "peft-lora", 1),
        "peft-ia3": save_peft_adapter(IA3Config(task_type="CAUSAL_LM"), root / "peft-ia3", 2, ia3=True, safe=False),
        "peft-prefix": save_peft_adapter(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), root / "peft-prefix", 3),
        "peft-prompt": save_peft_adapter(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), root / "peft-prompt", 4),
    }
    refs.update(adapterhub_adapters(root))
    for i in range(LORA_SETS):  # tiny LoRAs behind the 1,000-adapter case
        refs[f"set{i}"] = save_peft_adapter(LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]),
                                       root / f"set{i}", 100 + i)
    base = argmax_loop(hf_model("llama"))
    assert sum(r == base for r in refs.values()) == 0, "an adapter equals the base model: nothing would be proven"
    return root, refs


def files_parts(directory: Path) -> list:
    return [("files", (f.name, f.read_bytes())) for f in sorted(directory.iterdir()) if f.is_file()]


def zip_bytes(directory: Path, top: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(directory.iterdir()):
            z.write(f, f"{top}/{f.name}" if top else f.name)
    return buf.getvalue()


def tgz_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def upload(server, name: str, how: str, directory: Path, client: httpx.Client | None = None) -> httpx.Response:
    client = client or server.admin
    if how == "files":
        return client.post("/v1/adapters", data={"name": name}, files=files_parts(directory))
    if how == "zip":
        return client.post("/v1/adapters", data={"name": name}, files=[("archive", ("a.zip", zip_bytes(directory, "top")))])
    entries = {f.name: f.read_bytes() for f in directory.iterdir()}
    return client.post("/v1/adapters", data={"name": name}, files=[("archive", ("a.tar.gz", tgz_bytes(entries)))])


EVERY_TYPE = ["peft-lora", "peft-ia3", "peft-prefix", "peft-prompt", "ah-seqbn", "ah-compacter", "ah-inv", "ah-prefix",
              "ah-lora", "ah-ia3"]
