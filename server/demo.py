"""The demo adapters: one per adapter method, trained for the embedded default model by
`demo/train_adapters.py` and shipped in `server/demo_adapters/` (each folder as its library
saved it). `adapter-server serve --demo` registers them at startup."""

from __future__ import annotations

import json
from pathlib import Path

DEMO_DIR = Path(__file__).with_name("demo_adapters")


def manifest() -> dict:
    """What `demo/train_adapters.py` recorded: each adapter's name, method, library, style and
    measured effect, and the stacks worth trying (the MAD-X pair)."""
    return json.loads((DEMO_DIR / "manifest.json").read_text())


def demo_adapters() -> tuple[tuple[str, str], ...]:
    """(name, directory) of every demo adapter, in the manifest's order."""
    return tuple((a["name"], str(DEMO_DIR / a["name"])) for a in manifest()["adapters"])
