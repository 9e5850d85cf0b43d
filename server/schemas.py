"""Request and response bodies, shaped like OpenAI's completions and chat completions APIs
(with vLLM's sampling extensions) and vLLM's tokenizer endpoints.

Unknown request fields are kept (`extra="allow"`) so that `refused_fields` can tell the
harmless ones (`user`, `store`, ...) from those that would change the output and that this
server does not implement: those get a 400 naming the field, never a silent answer."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Prompt = Union[str, list[str], list[int], list[list[int]]]

# field -> the values that leave the output unchanged (a client may send them explicitly).
# Any other value of these fields is refused (400): the server does not implement them.
REFUSED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,), "structured_outputs": (None,),
    "prompt_logprobs": (None,),
    "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "min_p": (None, 0, 0.0),
    "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0), "early_stopping": (None, False),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "allowed_token_ids": (None,), "bad_words": (None, []),
    "truncate_prompt_tokens": (None,),
    "logits_processors": (None, []),
    "return_tokens_as_token_ids": (None, False),
    "chat_template": (None,),  # per request: the server's template only (--chat-template)
    "documents": (None, []),
    "mm_processor_kwargs": (None, {}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,),
    "vllm_xargs": (None, {}),
    "adapter_source": (None,), "merged_adapters": (None,),  # LoRAX: adapters come from this server's store
}
REFUSED_COMPLETIONS = {"add_special_tokens": (None, True)}  # completions always tokenize with special tokens
REFUSED_CHAT = {"echo": (None, False)}


def refused_fields(body: BaseModel, extra_rules: dict[str, tuple[Any, ...]] | None = None) -> list[str]:
    """Names of the unknown fields of `body` that would change the output if honoured."""
    rules = {**REFUSED, **(extra_rules or {})}
    return [k for k, v in (body.model_extra or {}).items() if k in rules and v not in rules[k]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # Python's json reads NaN and Infinity

    model: str
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="extension: sample from the k most likely tokens; 0 or -1 = off")
    n: int = Field(1, ge=1, le=128, description="choices per prompt, each its own seeded stream (seed + i)")
    best_of: int | None = Field(None, ge=1, le=128, description="generate this many per prompt, return the n with the "
                                "highest cumulative log-probability")
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, description="extension: extra token ids that end the completion")
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="extension: no end token or stop string before this many tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, description="extension (vLLM): > 1 discourages prompt and output tokens")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    user: str | None = None
    adapters: list[str] | dict[str, Any] | None = Field(
        None, description="extension: a stack of adapter names, applied in order, or a composition block "
        "({\"fuse\" | \"average\" | \"parallel\" | \"batch_split\" | \"multi_task\" | \"stack\": [...]}; README)")
    adapter_id: str | None = Field(None, description="LoRAX alias of `model`: the adapter to use")


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    """One message; extra keys (name, tool_call_id, ...) go to the chat template as they are."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatTemplateFields(BaseModel):
    """How messages become a prompt (vLLM's extensions of the chat request)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingRequest, ChatTemplateFields):
    max_tokens: int | None = Field(None, ge=0, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=0, description="default: the rest of the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class Logprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None  # the base model's name
    parent: str | None = None  # adapters: the base model they run on
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(ChatTemplateFields):
    """vLLM's /tokenize: either `prompt` (add_special_tokens defaults to true) or chat
    `messages` rendered with the chat template (add_special_tokens defaults to false)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
