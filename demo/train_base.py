"""Train the embedded default model: a small byte-level Llama (GQA) on Python's own documentation.

    .venv/bin/python -m demo.train_base            # 30-60 minutes on one CPU core

writes adapter_runtime/models/tiny_llama_embedded.safetensors (fp16 weights, the training
record in its metadata). The architecture is `default_model_config()`; the tokenizer is the
byte tokenizer (ids 0-255 are bytes, 256 is end-of-text). Training uses transformers'
`LlamaForCausalLM`, the class adapters are trained on, and a fixed seed: the same Python
(the corpus is its standard library) and torch give the same weights up to float rounding
across thread counts.

Schedule: AdamW, linear warm-up then cosine decay; 256-byte windows, then a short phase at
512 bytes so that prompts and completions up to 512 bytes are in the
trained range (the config accepts 2048 positions; text degrades past 512).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from adapter_runtime.models import DEFAULT_WEIGHTS, default_model_config

from .corpus import corpus_digest, documents, split, token_stream


def windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows of `length + 1` tokens (inputs and the next-token labels)."""
    starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=generator)
    return torch.stack([stream[s : s + length + 1] for s in starts.tolist()])  # [B, length + 1]


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def loss_of(model, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=chunk[:, :-1]).logits  # [B, S, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())


@torch.no_grad()
def evaluate(model, val: torch.Tensor, length: int, n: int = 32) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)  # the same held-out windows every time
    loss = loss_of(model, windows(val, n, length, g)).item()
    model.train()
    return loss


@torch.no_grad()
def sample(model, prompt: str, n: int = 160) -> str:
    """Greedy continuation, full forwards (no cache): a quick look at what the model writes."""
    model.eval()
    ids = list(prompt.encode())
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([ids[-512:]])).logits[0, -1].argmax())
        if nxt == 256:
            break
        ids.append(nxt)
    model.train()
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps in all")
    p.add_argument("--long-steps", type=int, default=100, help="of which the last ones use 512-byte windows")
    p.add_argument("--batch", type=int, default=16, help="256-byte windows per step (halved at 512 bytes)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    args = p.parse_args(argv)

    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    docs = documents()
    train_docs, val_docs = split(docs)
    train, val = token_stream(train_docs), token_stream(val_docs)
    config = default_model_config()
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").train()
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters; corpus {len(train):,} train / {len(val):,} validation bytes "
          f"({len(docs)} documents, sha256 {corpus_digest(docs)[:12]})", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(args.seed)
    start, seen, log = time.time(), 0, []
    for step in range(args.steps):
        long = step >= args.steps - args.long_steps
        length, batch = (512, args.batch // 2) if long else (256, args.batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=50, floor=args.lr / 10)
        loss = loss_of(model, windows(train, batch, length, g))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += batch * length
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {seen / (time.time() - start):.0f} tok/s  "
                  f"{time.time() - start:.0f}s", flush=True)
        if step % 200 == 199 or step == args.steps - 1:
            val_loss = evaluate(model, val, length)
            log.append({"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(val_loss, 4)})
            print(f"  validation loss {val_loss:.3f} nats/byte ({val_loss / math.log(2):.2f} bits/byte)", flush=True)

    minutes = (time.time() - start) / 60
    model.eval()
    val_loss = evaluate(model, val, 512)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied to the embedding
    record = {"corpus": "CPython stdlib docstrings + pydoc_data.topics", "corpus_sha256": corpus_digest(docs),
              "train_bytes": len(train), "python": platform.python_version(), "torch": torch.__version__,
              "seed": args.seed, "steps": args.steps, "long_steps": args.long_steps, "batch": args.batch,
              "lr": args.lr, "tokens_seen": seen, "minutes": round(minutes, 1), "threads": args.threads,
              "val_loss_512": round(val_loss, 4), "log": log}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"training": json.dumps(record)})
    print(json.dumps({k: v for k, v in record.items() if k != "log"}, indent=1))
    for prompt in ("Return the ", "The module ", "A class "):
        print(repr(sample(model, prompt)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
