"""Train the demo adapters, one per method, on the embedded model with the libraries themselves.

    .venv/bin/python -m demo.train_adapters            # 20-40 minutes on one CPU core
    .venv/bin/python -m demo.train_adapters --only lora-shout --out /tmp/try

PEFT trains the LoRA, the (IA)^3 and the prompt-tuning adapter; AdapterHub `adapters` the
bottleneck, the Compacter, the MAD-X pair (an invertible language adapter and a task adapter
trained stacked on it) and the prefix. Each is saved as its library saves it
(`save_pretrained` / `save_adapter`) into server/demo_adapters/NAME, which `adapter-server
serve --demo` registers. server/demo_adapters/manifest.json records what each one does and its
measured effect: a style measure (demo/styles.py) of greedy text from the base model and from
the adapter, on the same prompts.

Needs the test extra (`make .venv/.test`): peft and adapters are test-only dependencies.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapter_runtime.models import DEFAULT_WEIGHTS, default_model_config

from .corpus import EOS_ID, documents, token_stream
from .styles import STYLES
from .train_base import windows

OUT = Path(__file__).resolve().parents[1] / "server" / "demo_adapters"
PROMPTS = ("Return the", "The module", "This class", "If the file")  # what the effects are measured on
GEN_TOKENS = 64


@dataclass(frozen=True)
class Demo:
    name: str
    method: str  # lora | ia3 | prompt | bottleneck | compacter | invertible | prefix
    library: str  # peft | adapters
    style: str  # a key of styles.STYLES
    steps: int
    lr: float
    seed: int = 0  # added to --seed: the torch seed and the data order of this demo
    stack_on: str | None = None  # MAD-X: the language adapter this task adapter is trained (and served) on
    options: dict = field(default_factory=dict)


DEMOS = [
    Demo("lora-shout", "lora", "peft", "shout", steps=120, lr=5e-3),
    Demo("ia3-title", "ia3", "peft", "title", steps=120, lr=3e-2, seed=1),
    Demo("bottleneck-leet", "bottleneck", "adapters", "leet", steps=120, lr=5e-3),
    Demo("compacter-rot13", "compacter", "adapters", "rot13", steps=150, lr=1e-2),
    Demo("madx-abjad", "invertible", "adapters", "abjad", steps=120, lr=5e-3, seed=2),
    Demo("madx-snake", "bottleneck", "adapters", "abjad-snake", steps=100, lr=5e-3, seed=3, stack_on="madx-abjad"),
    Demo("prefix-snake", "prefix", "adapters", "snake", steps=120, lr=5e-3),
    Demo("prompt-title", "prompt", "peft", "title", steps=200, lr=0.1, options={"virtual_tokens": 32}),
]


# ---------------------------------------------------------------------------- models
def base_model():
    """The embedded model as transformers' LlamaForCausalLM (eager attention: AdapterHub's
    prefix tuning is only right there, see shared/reference)."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM._from_config(default_model_config(), attn_implementation="eager")
    state = {k: v.float() for k, v in load_file(DEFAULT_WEIGHTS).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def peft_model(demo: Demo, base):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

    if demo.method == "lora":
        config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    elif demo.method == "ia3":
        config = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                           feedforward_modules=["down_proj"])
    elif demo.method == "prompt":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=demo.options.get("virtual_tokens", 16))
    else:
        raise ValueError(demo.method)
    model = get_peft_model(base, config)
    if demo.method == "prompt":  # start from the embeddings of a real text rather than noise
        n = config.num_virtual_tokens
        seed_text = (STYLES[demo.style].description.encode() * n)[:n]
        with torch.no_grad():
            rows = base.get_input_embeddings().weight[torch.tensor(list(seed_text))]
            model.prompt_encoder["default"].embedding.weight.copy_(rows)
    return model


ADAPTERHUB_CONFIGS = {
    "bottleneck": lambda: __import__("adapters").SeqBnConfig(reduction_factor=8),
    "compacter": lambda: __import__("adapters").CompacterConfig(reduction_factor=16, phm_dim=4),
    "invertible": lambda: __import__("adapters").SeqBnInvConfig(reduction_factor=8),
    "prefix": lambda: __import__("adapters").PrefixTuningConfig(prefix_length=16, bottleneck_size=64),
}


def adapterhub_model(demo: Demo, base, trained: dict[str, Path]):
    """`adapters.init` on the base, the demo's adapter added and set to train; a MAD-X task
    adapter is trained on top of its (loaded, frozen) language adapter."""
    import adapters
    from adapters.composition import Stack

    adapters.init(base)
    if demo.stack_on:
        base.load_adapter(str(trained[demo.stack_on]), load_as=demo.stack_on)
    base.add_adapter(demo.name, config=ADAPTERHUB_CONFIGS[demo.method]())
    base.train_adapter(demo.name)  # freezes everything else
    if demo.stack_on:
        base.set_active_adapters(Stack(demo.stack_on, demo.name))
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all(f".{demo.name}." in f".{n}." or n.endswith(demo.name) for n in trainable), trainable[:5]
    return base


# ---------------------------------------------------------------------------- data, training
def style_stream(style_name: str) -> torch.Tensor:
    """The whole base corpus, every document rewritten in the style."""
    return token_stream([STYLES[style_name].transform(d) for d in documents()])


def train(model, stream: torch.Tensor, steps: int, lr: float, seed: int, batch: int = 8, length: int = 128) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10) * (1 - 0.9 * step / steps)
        chunk = windows(stream, batch, length, g)
        loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            print(f"  step {step:3d}  loss {loss.item():.3f}", flush=True)
    model.eval()
    return loss.item()


@torch.no_grad()
def greedy(model, prompt: str, n: int = GEN_TOKENS) -> str:
    """Greedy continuation by full forwards (the `adapters` library's Llama cache is broken
    with transformers 4.57, shared/reference §5.11)."""
    ids = list(prompt.encode())
    out: list[int] = []
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax())
        if nxt == EOS_ID:
            break
        out.append(nxt)
    return bytes(i for i in out if i < 256).decode("utf-8", "replace")


def effect(style_name: str, base_texts: list[str], texts: list[str]) -> dict:
    measure = STYLES[style_name].measure
    return {"base": round(sum(map(measure, base_texts)) / len(base_texts), 3),
            "adapter": round(sum(map(measure, texts)) / len(texts), 3)}


def save(model, demo: Demo, directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    if demo.library == "peft":
        model.save_pretrained(str(directory))
    else:
        model.save_adapter(str(directory), demo.name, with_head=False)  # the head is the tied embedding


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", help="train only these demos (repeatable)")
    p.add_argument("--steps", type=int, help="override every demo's step count")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-tokens", type=int, default=GEN_TOKENS, help="greedy tokens per prompt for the effects")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    chosen = [d for d in DEMOS if not args.only or d.name in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    base_texts = [greedy(base_model(), prompt, args.eval_tokens) for prompt in PROMPTS]
    trained = {d.name: args.out / d.name for d in DEMOS if (args.out / d.name).exists()}
    records = []
    for demo in chosen:
        torch.manual_seed(args.seed + demo.seed)
        start = time.time()
        print(f"{demo.name}: {demo.method} ({demo.library}), style {demo.style!r}", flush=True)
        base = base_model()
        model = peft_model(demo, base) if demo.library == "peft" else adapterhub_model(demo, base, trained)
        loss = train(model, style_stream(demo.style), args.steps or demo.steps, demo.lr, args.seed + demo.seed)
        texts = [greedy(model, prompt, args.eval_tokens) for prompt in PROMPTS]
        save(model, demo, args.out / demo.name)
        trained[demo.name] = args.out / demo.name
        record = {"name": demo.name, "method": demo.method, "library": demo.library, "style": demo.style,
                  "description": STYLES[demo.style].description, "stack": [demo.stack_on, demo.name] if demo.stack_on else None,
                  "steps": args.steps or demo.steps, "final_loss": round(loss, 3), "seconds": round(time.time() - start),
                  "effect": effect(demo.style, base_texts, texts), "sample": {"prompt": PROMPTS[0], "text": texts[0]}}
        records.append(record)
        print(json.dumps(record, indent=1), flush=True)

    manifest_path = args.out / "manifest.json"
    old = json.loads(manifest_path.read_text())["adapters"] if manifest_path.exists() else []
    merged = {r["name"]: r for r in old} | {r["name"]: r for r in records}
    adapters = [merged[d.name] for d in DEMOS if d.name in merged]
    manifest = {"base_sample": {"prompt": PROMPTS[0], "text": base_texts[0]}, "prompts": list(PROMPTS),
                "adapters": adapters}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
