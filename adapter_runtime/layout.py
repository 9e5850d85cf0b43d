"""Where a request's tokens go in the KV cache and which positions they take, given its
adapter setup (`row_layout`, which the engine and the scheduler use). The tests' one-shot
packed forward over whole sequences is tests/support/packed.py.

Token-space methods change the layout of a row (DESIGN.md, "Adapter sites"; the methods
themselves are methods/prefix.py and methods/prompt.py):
  prefix tuning  L extra KV entries at cache indices 0..L-1; PEFT shifts the real tokens'
                 positions by L, AdapterHub not.
  prompt tuning  n virtual tokens before the real ones, with positions 0..n-1; the real
                 tokens follow at n.. (PEFT). Their logits are dropped.
  ReFT suffix    the intervened window is the row's last tokens: a decode step re-runs them
                 (`recompute`), and the prompt is prefilled in one chunk (methods/reft.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .batch import Setup
from .errors import InvalidRequest
from .methods import prefix as prefix_method
from .methods import prompt as prompt_method
from .methods import reft as reft_method


@dataclass(frozen=True)
class RowLayout:
    prefix_len: int  # KV entries before the first token
    position_offset: int  # position of the first (virtual or real) token
    virtual_tokens: int  # soft-prompt tokens prepended to the real ones
    recompute: int = 0  # tokens before the newest that each decode step re-runs (ReFT suffix window)

    def positions(self, start: int, count: int) -> list[int]:
        """Positions of tokens start..start+count-1 (counted from the first virtual token)."""
        return list(range(self.position_offset + start, self.position_offset + start + count))


def row_layout(setup: Setup) -> RowLayout:
    if sum(a.prompt is not None for a in setup) > 1:
        raise InvalidRequest("a setup can hold at most one prompt-tuning adapter")
    return RowLayout(prefix_method.total_length(setup), prefix_method.position_shift(setup),
                     prompt_method.virtual_tokens(setup), reft_method.window(setup))
