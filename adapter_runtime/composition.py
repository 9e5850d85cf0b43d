"""Which adapters compose, and how: the composition rules next to the registry.

A request names one adapter, a Stack (a list of names) or a composition block (Stack, Fuse,
Average, Parallel, BatchSplit, MultiTask, reference §7). Every rule that decides whether the
runtime reproduces the library's meaning of a combination lives here; the math is in
methods/ (stack.py, bottleneck.py, compose.py).
"""

from __future__ import annotations

from typing import Sequence

from .adapters import Adapter, LoRA
from .errors import InvalidRequest



def validate_stack(setup: Sequence[Adapter]) -> None:
    """Refuse (InvalidRequest) a Stack whose meaning the runtime does not reproduce.

    Supported: any Stack of AdapterHub bottleneck / LoRA / IA3 / prefix / invertible adapters
    composed as in §7.2 (bottlenecks chain per location, the first adapter's NICE only, prefixes
    concatenate, linear effects apply in order), e.g. MAD-X Stack(lang SeqBnInv, task SeqBn).
    Refused: PEFT adapters or prompts in a Stack, LoRA/IA3 on GPT-2's fused c_attn in a Stack
    (the library raises there), a LoRA that would read an earlier adapter's output at a
    linear whose in != out (the library fails with a shape error), and a DoRA sharing a linear
    with another adapter of the stack."""
    if len(setup) <= 1:
        return
    for a in setup:
        if a.format != "adapterhub":
            raise InvalidRequest(f"adapter {a.name!r} ({a.format}) cannot be stacked: only AdapterHub adapters compose")
        if a.prompt is not None:
            raise InvalidRequest(f"prompt-tuning adapter {a.name!r} cannot be stacked")
        if any(module == "attn.c_attn" for _, module in a.linear):
            raise InvalidRequest(
                f"adapter {a.name!r} has LoRA/IA3 on GPT-2's fused attn.c_attn, which AdapterHub cannot stack"
            )
    sites = {site for a in setup for site in a.linear}
    for site in sites:
        effects = [(a.name, e) for a in setup if (e := a.linear.get(site)) is not None]
        dora = next((name for name, e in effects if isinstance(e, LoRA) and e.magnitude is not None), None)
        if dora is not None and len(effects) > 1:
            raise InvalidRequest(
                f"DoRA adapter {dora!r} shares layer {site[0]} {site[1]} with another adapter of the stack: the library "
                "renormalizes the composed delta by the last adapter's norm there, which this server does not compute")
        for name, e in effects[1:]:
            if isinstance(e, LoRA) and e.A.shape[1] != e.B.shape[0]:
                raise InvalidRequest(
                    f"LoRA {name!r} follows another adapter at layer {site[0]} {site[1]}, whose input and output "
                    f"sizes differ ({e.A.shape[1]} != {e.B.shape[0]}): a stacked LoRA reads the previous output"
                )

