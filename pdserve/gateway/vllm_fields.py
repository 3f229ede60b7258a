"""What the gateway does with each field of vLLM's OpenAI request models.

A vLLM upgrade adds request fields; the gateway passes unknown fields through, which is
right for most (sampling options, structured outputs, tools) and wrong for a few (fields
that point an instance at remote data, or that pdserve's split of a request into legs
cannot honour). ``tests/unit/test_vllm_fields.py`` introspects vLLM's own
``CompletionRequest`` and ``ChatCompletionRequest`` and fails on a field missing here, so
every new field is decided on, not silently dropped or silently mis-served.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from pdserve.gateway.errors import APIError


class FieldUse(enum.Enum):
    PASSED = "passed through to the instances unchanged"
    GATEWAY = "read or rewritten by the gateway (and its legs)"
    REFUSED = "refused with a 400 that says why"


# Fields a client may not set, and why (the message of the 400).
REFUSED: Mapping[str, str] = {
    "kv_transfer_params": "kv_transfer_params is reserved for pdserve",
    "ec_transfer_params": "ec_transfer_params is reserved for pdserve",
    "use_beam_search": "beam search is not served by pdserve: its beams cannot be split "
    "into prefill and decode legs; send the request to a plain vLLM instance",
    "prompt_embeds": "prompt_embeds are not served by pdserve: moving a request between "
    "instances needs its prompt as token ids",
}

# Fields the gateway reads or rewrites (validated in ``openai_api``; most also reach vLLM).
GATEWAY: frozenset[str] = frozenset(
    {
        "model",
        "prompt",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "min_tokens",
        "n",
        "echo",
        "stop",
        "seed",
        "temperature",
        "top_p",
        "return_token_ids",
        "logprobs",
        "prompt_logprobs",
        "request_id",
        "top_logprobs",
        "cache_salt",
        "priority",
    }
)

# Fields passed through: vLLM validates and applies them on every leg.
PASSED: frozenset[str] = frozenset(
    {
        "add_generation_prompt",
        "add_special_tokens",
        "allowed_token_ids",
        "bad_words",
        "chat_template",
        "chat_template_kwargs",
        "continue_final_message",
        "documents",
        "frequency_penalty",
        "ignore_eos",
        "include_reasoning",
        "include_stop_str_in_output",
        "length_penalty",
        "logit_bias",
        "logprob_token_ids",
        "media_io_kwargs",
        "min_p",
        "mm_payload",
        "mm_processor_kwargs",
        "parallel_tool_calls",
        "presence_penalty",
        "reasoning_effort",
        "repetition_detection",
        "repetition_penalty",
        "response_format",
        "return_mm_kwargs",
        "return_prompt_text",
        "return_token_offsets",
        "return_tokens_as_token_ids",
        "routed_experts_prompt_start",
        "session_id",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "stop_token_ids",
        "stream_interval",
        "structured_outputs",
        "suffix",
        "thinking_token_budget",
        "tool_choice",
        "tools",
        "top_k",
        "truncate_prompt_tokens",
        "truncation_side",
        "user",
        "vllm_xargs",
        "watermarking",
    }
)


def use_of(name: str) -> FieldUse | None:
    """How the gateway treats a vLLM request field; None for a field it has not decided on
    (passed through, like any unknown field)."""
    if name in REFUSED:
        return FieldUse.REFUSED
    if name in GATEWAY:
        return FieldUse.GATEWAY
    if name in PASSED:
        return FieldUse.PASSED
    return None


def refuse_fields(body: Mapping[str, object]) -> None:
    """Raises the 400 of the first refused field a request body sets."""
    for name, message in REFUSED.items():
        if name in body:
            raise APIError(400, message, param=name)
