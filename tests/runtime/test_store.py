"""The adapter store without a server. Two registries over one store folder, as two replicas of
a cluster see it (no Ray here): what one adds, deletes or replaces, the other serves, refuses or
re-reads at its next lookup, and neither deletes the other's write in progress. A scan hashes
weights only when their size or mtime changed; loading always checks the sha256."""

from __future__ import annotations

import os

import pytest
import torch

from tests.support.tiny import hf_model, save_checkpoint

peft = pytest.importorskip("peft")


def lora_dir(directory, seed: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model("llama"), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return [lora_dir(root / f"l{i}", 10 + i) for i in range(2)]


def replicas(tmp_path, shared: bool = True):
    from adapter_runtime.models import load_model
    from adapter_runtime.registry import AdapterRegistry, CacheLimits
    from adapter_runtime.store import AdapterStore

    info = load_model(save_checkpoint(hf_model("llama"), tmp_path / "ckpt")).info
    made = []
    for _ in range(2):
        reg = AdapterRegistry("base", store=AdapterStore(tmp_path / "store", info), limits=CacheLimits(device_adapters=4))
        reg.shared = shared
        made.append(reg)
    return made


def same_weights(x, y) -> bool:
    return all(torch.equal(p, q) for p, q in zip(x.tensors, y.tensors))


def test_what_one_replica_changes_the_other_sees_at_its_next_lookup(tmp_path, loras):
    from adapter_runtime.errors import AdapterConflict, AdapterNotFound

    a, b = replicas(tmp_path)
    a.add("x", loras[0])
    assert b.get("x").name == "x" and "x" in b.names()  # uploaded on a, servable on b at once
    assert b.status("x").location == "device"
    with pytest.raises(AdapterConflict):
        b.add("x", loras[1])  # the name is taken in the shared store

    a.delete("x")
    with pytest.raises(AdapterNotFound):
        b.get("x")  # b had it on its device: no stale copy is served
    assert "x" not in b.names() and b.stats()["device_adapters"] == 0
    with pytest.raises(AdapterNotFound):
        b.delete("x")

    a.add("x", loras[1])  # the same name again, other weights: servable on b
    assert b.get("x").name == "x" and "x" in b.names()


def test_a_replaced_adapter_is_read_again(tmp_path, loras):
    a, b = replicas(tmp_path)
    a.add("y", loras[0])
    old = b.get("y")
    a.delete("y")
    a.add("y", loras[1])
    new = b.get("y")  # b had the old weights on its device; it serves the new ones
    assert not same_weights(old, new) and same_weights(new, a.get("y"))


def test_without_sharing_a_registry_keeps_what_it_read(tmp_path, loras):
    """What the hook changes: an unshared registry (one server alone) never looks again."""
    from adapter_runtime.errors import AdapterNotFound

    a, b = replicas(tmp_path, shared=False)
    a.add("z", loras[0])
    with pytest.raises(AdapterNotFound):
        b.get("z")


def test_a_starting_replica_leaves_another_ones_upload_in_progress(tmp_path, loras):
    """A temp folder of a write in progress (fresh files) survives another replica's start and
    shutdown sweep; one untouched for an hour is a crashed write's leftover and goes."""
    import time

    from adapter_runtime.store import LEFTOVER_AGE_S, AdapterStore

    a, _ = replicas(tmp_path)
    busy, crashed = a.store.root / ".tmp-upload-busy", a.store.root / ".tmp-crashed"
    for folder in (busy, crashed):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "adapter_model.safetensors").write_bytes(b"partial")
    old = time.time() - LEFTOVER_AGE_S - 60
    for path in (crashed / "sub" / "adapter_model.safetensors", crashed / "sub", crashed):
        os.utime(path, (old, old))
    os.utime(busy, (old, old))  # an old folder whose file is still being written is busy

    other = AdapterStore(a.store.root, a.store.info)
    other.scan()  # what a replica does when it starts
    assert busy.is_dir() and not crashed.exists()
    other.sweep()  # and when it stops
    assert busy.is_dir()


def corrupt_in_place(path, keep_mtime: bool) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_scan_hashes_only_weights_that_changed_and_load_always_checks(tmp_path, loras, monkeypatch):
    from adapter_runtime import store as store_module
    from adapter_runtime.errors import AdapterFormatError
    from adapter_runtime.store import AdapterStore

    a, _ = replicas(tmp_path)
    for i, name in enumerate(("x", "y", "z")):
        a.add(name, loras[i % 2])
    hashed = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda p: hashed.append(p.parent.name) or real(p))

    fresh = AdapterStore(a.store.root, a.store.info)
    assert sorted(m.name for m in fresh.scan()) == ["x", "y", "z"] and hashed == []  # no weights read at start

    weights = next(p for p in (a.store.root / "y").iterdir() if p.suffix == ".safetensors")
    corrupt_in_place(weights, keep_mtime=False)
    assert sorted(m.name for m in fresh.scan()) == ["x", "z"] and hashed == ["y"]  # changed: hashed, refused
    assert "sha256 mismatch" in fresh.skipped["y"]

    weights = next(p for p in (a.store.root / "z").iterdir() if p.suffix == ".safetensors")
    corrupt_in_place(weights, keep_mtime=True)  # bit rot behind an unchanged size and mtime
    metas = {m.name: m for m in fresh.scan()}
    assert "z" in metas
    with pytest.raises(AdapterFormatError, match="sha256 mismatch"):
        fresh.load(metas["z"])  # never served
    fresh.load(metas["x"])
