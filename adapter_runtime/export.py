"""What the store writes and hands out: the stored form of an uploaded prefix (`eject_prefix`)
and the zip a download gets (`write_zip`). Both produce folders the adapter's own library loads
back: AdapterHub's flat prefix format, the files as stored (no meta.json)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import Tensor

from .adapters import Prefix
from .formats.adapterhub.keys import PREFIX_ALIAS


def eject_prefix(config: dict, tensors: dict[str, Tensor], prefix: Prefix | None) -> tuple[dict, dict[str, Tensor]]:
    """The saved files with a prefix in the form the store keeps: the flat K/V that `prefix`
    (this reader's result) holds, as a 1-D `control_trans`, and a config saying `flat: true`
    — the library's own flat format, so `adapters` loads it back (its `eject_prefix_tuning`
    keeps `flat: false` and crashes on grouped-query models; reference §3.4).
    Z[p, 2j + kv, head, d] is the j-th prefix layer's key (kv=0) or value (kv=1)."""
    parts = config["config"]["configs"] if config["config"].get("architecture") == "union" else [config["config"]]
    part = next((c for c in parts if c.get("architecture") == "prefix_tuning"), None)
    if part is None or prefix is None:
        return config, tensors
    canonical = [k for k in tensors if "prefix_tuning.prefix_tunings." in k and ".self_prefix." in k
                 and PREFIX_ALIAS not in k]
    base = canonical[0].split("self_prefix.")[0] + "self_prefix."
    layers = sorted(prefix.keys)
    Z = torch.stack([t for layer in layers for t in (prefix.keys[layer], prefix.values[layer])])  # [2 n_pl, nkv, L, hd]
    flat = Z.permute(2, 0, 1, 3).reshape(-1).contiguous()  # [L * 2 n_pl * nkv * hd]
    kept = {k: v for k, v in tensors.items() if not (k.startswith(base) or PREFIX_ALIAS in k)}
    kept[base + "control_trans"] = flat
    part["flat"] = True
    return config, kept


def write_zip(folder: Path, out, skip: tuple[str, ...] = ("meta.json",)) -> None:
    """The stored folder's files (config, weights, head; not `skip`) as a zip into file object `out`."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            if f.name not in skip:
                z.write(f, f.name)
