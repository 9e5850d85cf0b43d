"""Which adapters compose, and how: the composition rules next to the registry.

A request names one adapter (`model`), a Stack (`adapters`: a list of names) or a composition
block (`adapters`: an object, reference §7-§8):

    {"stack": [child, ...]}
    {"fuse": [child, ...], "name": "<stored fusion>"}          name optional: else the stored
                                                                fusion made for these adapters
    {"average": [child, ...], "weights": [w, ...], "normalize_weights": true}
    {"parallel": [child, ...]}                                  one row (choice) per child
    {"batch_split": [child, ...], "batch_sizes": [n, ...]}      over the request's prompts
    {"multi_task": [child, ...], "task_ids": [i or name, ...]}  one task per prompt
    child := an adapter name | a block

A stored fusion's name used where an adapter name goes means Fuse(its adapters) with it.

`request_rows` turns the request into engine rows (Parallel: one per channel and prompt;
BatchSplit / MultiTask: each prompt's child); the registry resolves each row with `build_row`
into a `Block` tree (methods/compose.py) after `validate_tree` checked the library's nesting
rules and every combination the library fails on or that this server does not reproduce.
A row whose tree provably computes what a plain Stack of its adapters computes is served as
that Stack (`plain_equivalent`: a Parallel channel of one adapter is then banked like any
single adapter); the others take the side path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from .adapters import Adapter, LoRA
from .errors import AdapterNotFound, InvalidRequest
from .methods.compose import AVERAGE, BATCH_SPLIT, FUSE, MULTI_TASK, PARALLEL, SPLITS, STACK, Block, Composed

KINDS = (STACK, FUSE, AVERAGE, PARALLEL, BATCH_SPLIT, MULTI_TASK)
OPTIONS = {FUSE: ("name",), AVERAGE: ("weights", "normalize_weights"), BATCH_SPLIT: ("batch_sizes",),
           MULTI_TASK: ("task_ids",)}
LIBRARY_NAMES = {STACK: "Stack", FUSE: "Fuse", AVERAGE: "Average", PARALLEL: "Parallel", BATCH_SPLIT: "BatchSplit",
                 MULTI_TASK: "MultiTask"}
# adapters 1.3.0 composition.ALLOWED_NESTINGS (Split aside): block -> kinds of its direct children
ALLOWED_CHILDREN = {
    STACK: ("name", FUSE, PARALLEL, BATCH_SPLIT, AVERAGE, MULTI_TASK),
    FUSE: ("name", STACK),
    PARALLEL: ("name", STACK, BATCH_SPLIT, AVERAGE),
    MULTI_TASK: ("name", STACK, AVERAGE, FUSE),
    BATCH_SPLIT: ("name", STACK, BATCH_SPLIT, AVERAGE),
    AVERAGE: ("name", STACK, BATCH_SPLIT),
}
PARALLEL_MODEL_TYPES = ("gpt2", "llama", "mistral")  # composition.SUPPORTED_MODELS[Parallel] among ours
MAX_CHILDREN = 64


# --------------------------------------------------------------------------- the request's shape


@dataclass(frozen=True)
class Spec:
    """A parsed composition block, children by name (resolved per row by `build_row`)."""

    kind: str
    children: tuple  # str | Spec
    weights: tuple[float, ...] | None = None
    normalize_weights: bool = True
    batch_sizes: tuple[int, ...] | None = None
    task_ids: tuple = ()
    fusion: str | None = None

    def names(self) -> list[str]:
        own = [self.fusion] if self.fusion else []
        return own + [n for c in self.children for n in (c.names() if isinstance(c, Spec) else [c])]

    @property
    def channels(self) -> int:
        """The library's `parallel_channels`: rows per prompt."""
        if self.kind == PARALLEL:
            return len(self.children)
        return max(c.channels if isinstance(c, Spec) else 1 for c in self.children)

    def describe(self) -> str:
        inner = ", ".join(c.describe() if isinstance(c, Spec) else repr(c) for c in self.children)
        return f"{LIBRARY_NAMES[self.kind]}({inner})"


def parse(adapters: Any, where: str = "adapters") -> Spec:
    """A composition object (see the module docstring) -> Spec; InvalidRequest names what is wrong."""
    if isinstance(adapters, list):  # a Stack, as a plain list of names
        return Spec(STACK, tuple(_name(n, f"{where}[{i}]") for i, n in enumerate(adapters)))
    if not isinstance(adapters, Mapping):
        raise InvalidRequest(f"{where} must be an adapter name, a list of names or a composition object "
                             f"({', '.join(KINDS)}), got {type(adapters).__name__}", param="adapters")
    kinds = [k for k in adapters if k in KINDS]
    if len(kinds) != 1:
        raise InvalidRequest(f"{where} must hold exactly one block key of {', '.join(KINDS)}; got "
                             f"{sorted(map(str, adapters)) or 'an empty object'}", param="adapters")
    kind = kinds[0]
    unknown = sorted(set(adapters) - {kind, *OPTIONS.get(kind, ())})
    if unknown:
        allowed = ", ".join(OPTIONS.get(kind, ())) or "none"
        raise InvalidRequest(f"{where}: {kind} does not take {', '.join(map(repr, unknown))} (options: {allowed})",
                             param="adapters")
    children = adapters[kind]
    if not isinstance(children, list) or not children:
        raise InvalidRequest(f"{where}.{kind} must be a non-empty list of adapter names or blocks", param="adapters")
    if len(children) > MAX_CHILDREN:
        raise InvalidRequest(f"{where}.{kind} has {len(children)} children, over {MAX_CHILDREN}", param="adapters")
    parsed = tuple(_name(c, f"{where}.{kind}[{i}]") if not isinstance(c, (Mapping, list)) else
                   parse(c, f"{where}.{kind}[{i}]") for i, c in enumerate(children))
    spec = Spec(kind, parsed)
    if kind == FUSE:
        fusion = adapters.get("name")
        if fusion is not None:
            spec = Spec(kind, parsed, fusion=_name(fusion, f"{where}.name"))
    elif kind == AVERAGE:
        spec = _average(spec, adapters, where)
    elif kind == BATCH_SPLIT:
        sizes = adapters.get("batch_sizes")
        if isinstance(sizes, int) and not isinstance(sizes, bool):  # the library repeats one size
            sizes = [sizes] * len(parsed)
        if not isinstance(sizes, list) or len(sizes) != len(parsed) or \
                not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
            raise InvalidRequest(f"{where}.batch_sizes must give a non-negative number of prompts for each of the "
                                 f"{len(parsed)} children", param="adapters")
        spec = Spec(kind, parsed, batch_sizes=tuple(sizes))
    elif kind == MULTI_TASK:
        ids = adapters.get("task_ids")
        if not isinstance(ids, list) or not ids:
            raise InvalidRequest(f"{where}.task_ids must list one task (a child's index or name) per prompt",
                                 param="adapters")
        names = [c if isinstance(c, str) else None for c in parsed]
        tasks = []
        for t in ids:
            if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(parsed):
                tasks.append(t)
            elif isinstance(t, str) and t in names:
                tasks.append(names.index(t))
            else:
                raise InvalidRequest(f"{where}.task_ids: {t!r} is not a child of the multi_task block (an index "
                                     f"0..{len(parsed) - 1} or a child's name)", param="adapters")
        spec = Spec(kind, parsed, task_ids=tuple(tasks))
    return spec


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where} must be an adapter name (a string) or a block, got {value!r}", param="adapters")
    return value


def _average(spec: Spec, adapters: Mapping, where: str) -> Spec:
    """The library's Average weights: [1/N]*N by default; given ones divided by their sum when
    normalize_weights (a zero sum is its ZeroDivisionError)."""
    n = len(spec.children)
    normalize = adapters.get("normalize_weights", True)
    if not isinstance(normalize, bool):
        raise InvalidRequest(f"{where}.normalize_weights must be true or false", param="adapters")
    weights = adapters.get("weights")
    if weights is None:
        return Spec(AVERAGE, spec.children, weights=(1 / n,) * n, normalize_weights=normalize)
    if not isinstance(weights, list) or len(weights) != n or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise InvalidRequest(f"{where}.weights must give one finite number for each of the {n} children",
                             param="adapters")
    if normalize:
        total = sum(weights)
        if total == 0:
            raise InvalidRequest(f"{where}.weights sum to 0: with normalize_weights the library divides the weights "
                                 "by their sum (ZeroDivisionError); give weights with a non-zero sum", param="adapters")
        weights = [w / total for w in weights]
    return Spec(AVERAGE, spec.children, weights=tuple(float(w) for w in weights), normalize_weights=normalize)


# --------------------------------------------------------------------------- rows of a request


@dataclass(frozen=True)
class RowRequest:
    """One engine row of a composition request: the composition (as sent), the Parallel channel
    and the prompt (batch row) it runs. Iterates the adapter names, as a stack's list does
    (routing keys, metrics)."""

    adapters: Mapping
    channel: int = 0
    batch_row: int = 0
    batch_size: int = 1

    @property
    def spec(self) -> Spec:
        return parse(self.adapters)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(self.spec.names()))


def adapter_names(adapters) -> list[str]:
    """Every adapter name a request's `adapters` field mentions (once each)."""
    if adapters is None:
        return []
    if isinstance(adapters, (list, Mapping)):
        return list(dict.fromkeys(parse(adapters).names()))
    return list(dict.fromkeys(adapters))


def request_rows(adapters, num_prompts: int) -> list[list]:
    """Per prompt, the `adapters` argument of each of its engine rows: the field itself for no
    adapters or a Stack list; for a composition one `RowRequest` per Parallel channel."""
    if adapters is None or isinstance(adapters, list):
        return [[adapters] for _ in range(num_prompts)]
    spec = parse(adapters)
    _check_splits(spec, num_prompts)
    return [[RowRequest(dict(adapters), c, i, num_prompts) for c in range(spec.channels)] for i in range(num_prompts)]


def _check_splits(spec: Spec, num_prompts: int, in_parallel: bool = False, has_parallel: bool | None = None) -> None:
    """BatchSplit sizes and MultiTask ids cover the request's prompts; Parallel blocks agree on
    their channel count (the library slices the replicated batch by each block's own count)."""
    if has_parallel is None:
        counts = {len(b.children) for b in _specs(spec) if b.kind == PARALLEL}
        if len(counts) > 1:
            raise InvalidRequest(f"the Parallel blocks of {spec.describe()} have different numbers of children "
                                 f"({sorted(counts)}); the library slices the replicated batch by each block's own "
                                 "count, which only works when they agree", param="adapters")
        has_parallel = bool(counts)
    if spec.kind == BATCH_SPLIT:
        if has_parallel and not in_parallel:
            raise InvalidRequest("a batch_split outside the parallel block of the same setup splits the replicated "
                                 "batch (channels x prompts), which is not supported; put it inside the parallel",
                                 param="adapters")
        if sum(spec.batch_sizes) != num_prompts:
            raise InvalidRequest(f"batch_sizes {list(spec.batch_sizes)} sum to {sum(spec.batch_sizes)}, but the request "
                                 f"has {num_prompts} prompt(s): the library requires the sum to equal the batch size",
                                 param="adapters")
    if spec.kind == MULTI_TASK:
        if has_parallel:
            raise InvalidRequest("multi_task cannot be combined with parallel", param="adapters")
        if len(spec.task_ids) != num_prompts:
            raise InvalidRequest(f"task_ids has {len(spec.task_ids)} entries, but the request has {num_prompts} "
                                 "prompt(s): give one task per prompt", param="adapters")
    for c in spec.children:
        if isinstance(c, Spec):
            _check_splits(c, num_prompts, in_parallel or spec.kind == PARALLEL, has_parallel)


def _specs(spec: Spec) -> list[Spec]:
    return [spec, *(s for c in spec.children if isinstance(c, Spec) for s in _specs(c))]


# --------------------------------------------------------------------------- resolving a row


def build_row(spec: Spec, row: RowRequest | None, get: Callable[[str], Adapter],
              find_fusion: Callable[[list[str]], Adapter]) -> Block:
    """The row's tree: names resolved with `get` (a stored fusion's name becomes a Fuse of its
    adapters), split blocks set to the row's child."""
    row = row or RowRequest({}, 0, 0, 1)

    def named(name: str, where: str) -> Adapter:
        try:
            return get(name)
        except AdapterNotFound as e:
            raise InvalidRequest(f"{where}: {e}", param="adapters") from None

    def leaf(name: str, where: str, inside: str | None = None):
        adapter = named(name, where)
        if adapter.fusion is None:
            return adapter
        if inside is not None:
            raise InvalidRequest(f"fusion {inside!r} lists {name!r}, itself a fusion", param="adapters")
        children = tuple(leaf(n, f"adapter {n!r} of fusion {name!r}", name) for n in adapter.fusion.adapter_names)
        return Block(FUSE, children, fusion=adapter)

    def build(s: Spec) -> Block:
        children = tuple(build(c) if isinstance(c, Spec) else leaf(c, f"adapter {c!r} of {s.describe()}")
                         for c in s.children)
        if s.kind == FUSE:
            if s.fusion is not None:
                fusion = named(s.fusion, f"the fusion of {s.describe()}")
                if fusion.fusion is None:
                    raise InvalidRequest(f"{s.fusion!r} is not an AdapterFusion (it is a {fusion.method} adapter)",
                                         param="adapters")
            else:
                _check_fused_adapters(Block(FUSE, children))  # the real problem before "no such fusion"
                fused = [c.last().name if isinstance(c, Block) else c.name for c in children]
                fusion = find_fusion(fused)
            return Block(FUSE, children, fusion=fusion)
        chosen = 0
        if s.kind == PARALLEL:
            chosen = row.channel
        elif s.kind == BATCH_SPLIT:
            ends = [sum(s.batch_sizes[: i + 1]) for i in range(len(s.batch_sizes))]
            chosen = next(i for i, end in enumerate(ends) if row.batch_row < end)
        elif s.kind == MULTI_TASK:
            chosen = s.task_ids[row.batch_row]
        return Block(s.kind, children, weights=s.weights or (), chosen=chosen)

    return build(spec)


# --------------------------------------------------------------------------- the rules


def _describe(node) -> str:
    if isinstance(node, Adapter):
        return repr(node.name)
    inner = ", ".join(_describe(c) for c in node.children)
    return f"{LIBRARY_NAMES[node.kind]}({inner})"


def _touches(node, table: str, site) -> bool:
    if isinstance(node, Adapter):
        return site in getattr(node, table)
    return any(site in getattr(a, table) for a in node.leaves())


def _where(site) -> str:
    return f"layer {site[0]} {site[1]}"


def validate_tree(root: Block) -> None:
    """InvalidRequest unless the library runs `root` and this server reproduces what it computes."""
    _check_nesting(root)
    leaves = root.leaves()
    for a in leaves:
        if a.format != "adapterhub":
            raise InvalidRequest(f"adapter {a.name!r} ({a.format}) cannot be composed: composition blocks are the "
                                 "`adapters` library's, for AdapterHub adapters", param="adapters")
        if a.prompt is not None or a.head is not None:
            raise InvalidRequest(f"adapter {a.name!r} carries a {'prompt' if a.prompt is not None else 'flex LM head'}"
                                 ", which is only served alone or in a plain stack", param="adapters")
        if any(module == "attn.c_attn" for _, module in a.linear):
            raise InvalidRequest(f"adapter {a.name!r} has LoRA/IA3 on GPT-2's fused attn.c_attn: adapters 1.3.0 "
                                 "refuses every composition block with it (\"Invalid adapter setup\")", param="adapters")
        if any(isinstance(e, LoRA) and e.magnitude is not None for e in a.linear.values()):
            raise InvalidRequest(f"DoRA adapter {a.name!r} cannot be composed: the library renormalizes a composed "
                                 "delta by the last adapter's norm, which this server does not compute",
                                 param="adapters")
    if root.kind == PARALLEL:  # the library checks the model type of a top-level Parallel only
        model_type = root.first().config.get("model_type")
        if model_type is not None and model_type not in PARALLEL_MODEL_TYPES:
            raise InvalidRequest(f"adapters 1.3.0 does not support Parallel for model type {model_type!r}",
                                 param="adapters")
    for b in root.blocks():
        if b.kind == AVERAGE and any(a.prefix is not None for a in b.leaves()):
            name = next(a.name for a in b.leaves() if a.prefix is not None)
            raise InvalidRequest(f"{_describe(b)} holds prefix-tuning adapter {name!r}: the library cannot average "
                                 "prefixes (NotImplementedError)", param="adapters")
        if b.kind == FUSE:
            _check_fuse(b)
    for site in sorted({s for a in leaves for s in a.bottleneck}):
        _check_site(root, "bottleneck", site)
    for site in sorted({s for a in leaves for s in a.linear}):
        _check_site(root, "linear", site)
        _check_chain(root, site, False)


def _check_nesting(root: Block) -> None:
    """adapters 1.3.0 `validate_composition` (allowed children, depth) and the compose-time rule
    that a Stack below the top level holds names only."""

    def visit(node: Block, level: int) -> None:
        if level > 1 and node.kind != STACK:
            raise InvalidRequest(f"adapter setup is too deep: {_describe(node)} at level {level} (below the top "
                                 "block's children only stacks and names are allowed)", param="adapters")
        for c in node.children:
            kind = "name" if isinstance(c, Adapter) else c.kind
            if kind not in ALLOWED_CHILDREN[node.kind]:
                raise InvalidRequest(f"{LIBRARY_NAMES[node.kind]} cannot hold {_describe(c)}: the library allows "
                                     f"{', '.join(LIBRARY_NAMES.get(k, k) for k in ALLOWED_CHILDREN[node.kind])} "
                                     "there", param="adapters")
            if isinstance(c, Block):
                if node.kind == STACK and level >= 1:
                    raise InvalidRequest(f"adapter setup is too deep: the nested {_describe(node)} holds "
                                         f"{_describe(c)}", param="adapters")
                visit(c, level + 1)

    visit(root, 0)


def _check_fuse(block: Block) -> None:
    _check_fused_adapters(block)
    fusion = block.fusion
    missing = sorted({s for a in block.leaves() for s in a.bottleneck} - set(fusion.fusion.layers))
    if missing:
        raise InvalidRequest(f"fusion {fusion.name!r} has no fusion layer at {_where(missing[0])}, where the adapters "
                             f"of {_describe(block)} act", param="adapters")


def _check_fused_adapters(block: Block) -> None:
    for a in block.leaves():
        if not a.bottleneck or a.linear or a.prefix is not None:
            raise InvalidRequest(f"{_describe(block)}: {a.name!r} is a {a.method} adapter; AdapterFusion fuses "
                                 "bottleneck adapters only (the library raises NotImplementedError for others)",
                                 param="adapters")


def _check_site(root: Block, table: str, site) -> None:
    """At a site where some adapter of the setup acts: the blocks the library visits there."""
    for b in root.blocks():
        present = [c for c in b.children if _touches(c, table, site)]
        if table == "bottleneck" and b.kind != STACK:
            lead = b.last() if b.kind == FUSE else b.first()
            if not _touches(lead, table, site):
                other = next(a.name for a in root.leaves() if site in a.bottleneck)
                role = "last" if b.kind == FUSE else "first"
                raise InvalidRequest(f"{_describe(b)}: its {role} adapter {lead.name!r} has no bottleneck at "
                                     f"{_where(site)}, where {other!r} has one; adapters 1.3.0 fails there (KeyError)",
                                     param="adapters")
        if b.kind in SPLITS and len(present) not in (0, len(b.children)):
            raise InvalidRequest(f"the children of {_describe(b)} do not all act at {_where(site)}; the library fails "
                                 "(or mixes rows) when the children of a split block act at different places",
                                 param="adapters")
        if b.kind == AVERAGE:
            counted = [c for c in b.children if isinstance(c, Block) or _touches(c, table, site)]
            if len(present) != len(counted) or len(present) not in (1, len(b.children)):
                raise InvalidRequest(f"{_describe(b)}: {len(present)} of its {len(b.children)} children act at "
                                     f"{_where(site)}; the library averages either all of them or one (broadcast), "
                                     "and fails otherwise", param="adapters")
        if table == "linear" and b.kind in (AVERAGE, *SPLITS) and len(present) > 1:
            modes = {_mode(c, site) for c in present}
            if len(modes) > 1:
                raise InvalidRequest(f"{_describe(b)} mixes LoRA and (IA)^3 at {_where(site)}: the library cannot "
                                     "combine their outputs (shape mismatch)", param="adapters")


def _mode(node, site) -> str:
    """'lora' or 'ia3': the kind of the last effect a child applies at a linear site."""
    adapters = [node] if isinstance(node, Adapter) else node.leaves()
    last = [a for a in adapters if site in a.linear][-1]
    return "lora" if isinstance(last.linear[site], LoRA) else "ia3"


def _check_chain(node, site, has_value: bool) -> bool:
    """A LoRA that reads an earlier adapter's output (stacked after it) needs in == out."""
    if isinstance(node, Adapter):
        e = node.linear.get(site)
        if e is None:
            return has_value
        if isinstance(e, LoRA) and has_value and e.A.shape[1] != e.B.shape[0]:
            raise InvalidRequest(f"LoRA {node.name!r} follows another adapter at {_where(site)}, whose input and "
                                 f"output sizes differ ({e.A.shape[1]} != {e.B.shape[0]}): a stacked LoRA reads the "
                                 "previous output, and the library fails with a shape error", param="adapters")
        return True
    if node.kind == STACK:
        for c in node.children:
            has_value = _check_chain(c, site, has_value)
        return has_value
    return any([_check_chain(c, site, has_value) for c in node.children])


# --------------------------------------------------------------------------- serving a row


def plain_equivalent(root: Block) -> tuple[Adapter, ...] | None:
    """The row's adapters as a plain Stack, when that computes exactly what the tree does: no
    Average or Fuse on the row's path; the NICE / ReFT of the setup's first leaf is the
    stack's; and at every bottleneck location each split block's pre-processing (its first
    leaf's) and the library's final post-processing (the last child's last adapter) are the
    ones the stack would apply."""
    path = root.path()
    on_path = _path_blocks(root)
    if any(b.kind in (AVERAGE, FUSE) for b in on_path):
        return None
    first = root.first()
    if path[0] is not first and (first.invertible is not None or first.reft is not None
                                 or path[0].invertible is not None or path[0].reft is not None):
        return None
    for site in {s for a in root.leaves() for s in a.bottleneck}:
        for b in on_path:
            if b.kind not in SPLITS:
                continue
            child = b.children[b.chosen]
            if b.kind == MULTI_TASK or isinstance(child, Block):
                return None
            f, own = b.first().bottleneck[site], child.bottleneck[site]
            if (f.is_parallel, f.original_ln_before, f.residual_before_ln is True) != \
                    (own.is_parallel, own.original_ln_before, own.residual_before_ln is True):
                return None
        from .methods.compose import _last

        library_last = _last(root, site, None)
        stack_last = [a for a in path if site in a.bottleneck][-1]
        lb, sb = library_last.bottleneck[site], stack_last.bottleneck[site]
        if (lb.is_parallel, lb.original_ln_after) != (sb.is_parallel, sb.original_ln_after):
            return None
    return tuple(path)


def _path_blocks(node: Block) -> list[Block]:
    children = (node.children[node.chosen],) if node.kind in SPLITS else node.children
    return [node, *(b for c in children if isinstance(c, Block) for b in _path_blocks(c))]


def row_setup(root: Block) -> tuple[Adapter, ...]:
    """What the engine runs for a validated row: a plain Stack if equivalent, else `Composed`."""
    if root.kind == STACK and all(isinstance(c, Adapter) for c in root.children):
        validate_stack(root.children)
        return tuple(root.children)
    plain = plain_equivalent(root)
    if plain is not None:
        validate_stack(plain)
        return plain
    return Composed(root)


def check_reft_prompt(setup: Sequence[Adapter], prompt_len: int) -> None:
    """A ReFT row with prefix and suffix positions whose sequence would be shorter than
    suffix_positions: adapters 1.3.0 scatters the wrong states there (methods/reft.py)."""
    block = getattr(setup, "block", None)
    first = block.first() if block is not None else (setup[0] if setup else None)
    reft = first.reft if first is not None else None
    if reft is not None and reft.prefix_positions and prompt_len < reft.suffix_positions:
        raise InvalidRequest(f"adapter {first.name!r} (ReFT, prefix_positions {reft.prefix_positions}, "
                             f"suffix_positions {reft.suffix_positions}) needs a prompt of at least "
                             f"{reft.suffix_positions} tokens: on shorter sequences adapters 1.3.0 writes the "
                             "suffix interventions from the wrong positions")


def validate_stack(setup: Sequence[Adapter]) -> None:
    """Refuse (InvalidRequest) a Stack whose meaning the runtime does not reproduce.

    Supported: any Stack of AdapterHub bottleneck / LoRA / IA3 / prefix / invertible / ReFT
    adapters composed as in §7.2 (bottlenecks chain per location, the first adapter's NICE and
    ReFT only, prefixes concatenate, linear effects apply in order), e.g. MAD-X Stack(lang
    SeqBnInv, task SeqBn). Refused: PEFT adapters or prompts in a Stack, LoRA/IA3 on GPT-2's
    fused c_attn in a Stack (the library raises there), a LoRA that would read an earlier
    adapter's output at a linear whose in != out (the library fails with a shape error), and a
    DoRA sharing a linear with another adapter of the stack."""
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
