"""Tokenizers: the embedded byte-level tokenizer (with its chat template), HF tokenizers from
a model directory, and chat messages rendered into prompt token ids."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from .errors import InvalidRequest

EOS_TOKEN = "<|endoftext|>"

# The byte-level tokenizer's chat template (so that the embedded default model chats with no
# flags). Plain-text role markers, one message per block; an assistant turn ends with the
# end-of-text token, which is what stops generation. Two turns and the generation prompt:
#   "<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\nHello<|endoftext|>\n<|user|>\nAgain\n<|assistant|>\n"
BYTE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{% endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{% endif %}"
)

# apply_chat_template's own arguments: never taken from a request's chat_template_kwargs
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs",
})


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table used by byte-level BPE: printable
    Latin-1 bytes map to themselves, the other bytes to code points from 256 upwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_byte_tokenizer():
    """A real `PreTrainedTokenizerFast` whose ids are the 256 byte values, plus an end-of-text
    token (id 256). Built in-process: no files, no download. Any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab[EOS_TOKEN] = 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        chat_template=BYTE_CHAT_TEMPLATE,
    )


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved beside a checkpoint, through transformers, never from a hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def render_chat(tokenizer, messages: Sequence[dict[str, Any]], template: str, add_generation_prompt: bool = True,
                continue_final_message: bool = False, add_special_tokens: bool = False,
                template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Chat messages -> prompt token ids, through transformers' `apply_chat_template` (a
    sandboxed Jinja environment): the template renders the text, which is then tokenized
    (without special tokens unless asked: templates write their own BOS). A template that
    fails on these messages is the request's fault: InvalidRequest."""
    from jinja2 import TemplateError

    kwargs = dict(template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise InvalidRequest(f"chat_template_kwargs must not set {', '.join(reserved)}")
    if add_generation_prompt and continue_final_message:
        raise InvalidRequest("add_generation_prompt and continue_final_message cannot both be true")
    try:
        text = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        raise InvalidRequest(f"the chat template cannot render these messages: {type(e).__name__}: {e}") from None
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
