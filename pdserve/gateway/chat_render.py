"""The text vLLM 0.32's chat endpoint tokenizes for a request, rendered at the gateway.

vLLM (``renderers/hf.py``, ``renderers/chat_utils.py``) turns the messages into a
*conversation* (text parts joined by newlines, or kept as ``{"type": "text"}`` parts when the
chat template iterates over a message's content: its "content format"), renders the chat
template with ``tokenize=False`` and the request's template options, and then tokenizes that
text like a completion prompt (``add_special_tokens`` false by default for chat).

The gateway does the same for the messages it can render exactly as vLLM does: text content
(a string, None, or ``{"type": "text", "text": ...}`` parts), any role but ``developer``
(which vLLM rewrites for templates that lack it), no tool calls in the history (vLLM parses
their JSON arguments), no request-level chat template (vLLM refuses those unless trusted).
Anything else raises ``Unsupported``, and the gateway falls back to its estimate: a count it
cannot vouch for is worse than an estimate that says so.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

ContentFormat = Literal["string", "openai"]

# Request fields that change what vLLM renders in ways the gateway does not reproduce.
UNRENDERED_FIELDS = ("chat_template", "media_io_kwargs", "mm_processor_kwargs", "mm_payload")
# Chat template options vLLM takes from the request body (``build_chat_params``).
_TEMPLATE_OPTIONS = ("documents", "reasoning_effort")
# What vLLM drops from a system message's first line (a per-request attribution header).
_BILLING_HEADER = "x-anthropic-billing-header"


class Unsupported(Exception):
    """A request the gateway cannot render exactly as vLLM does; the message says why."""


def _texts(message: Mapping[str, Any]) -> list[str]:
    """The message's text parts, as vLLM reads them (None content: no parts)."""
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise Unsupported("message content that is neither text nor a list of parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or set(part) - {"type", "text"}:
            raise Unsupported("a content part that is not plain text")
        if not isinstance(part.get("text"), str):
            raise Unsupported("a text part without text")
        texts.append(part["text"])
    return texts


def _message(message: Mapping[str, Any], content_format: ContentFormat) -> dict[str, Any]:
    """One conversation entry, as vLLM's ``_parse_chat_message_content`` makes it."""
    role = message.get("role")
    if not isinstance(role, str) or role == "developer":
        raise Unsupported("the developer role (vLLM rewrites it per template)")
    if message.get("tool_calls"):
        raise Unsupported("tool calls in the conversation")
    texts = _texts(message)
    if role == "system" and texts and texts[0].startswith(_BILLING_HEADER):
        raise Unsupported("a system message with an attribution header")
    entry: dict[str, Any] = {"role": role}
    if content_format == "string" or role == "tool":  # vLLM joins a tool result's parts
        entry["content"] = "\n".join(texts)
    else:
        entry["content"] = [{"type": "text", "text": text} for text in texts]
    reasoning = message.get("reasoning")
    if reasoning is None:  # vLLM's request model renames the old field
        reasoning = message.get("reasoning_content")
    if role == "assistant" and reasoning is not None:
        entry["reasoning"] = entry["reasoning_content"] = reasoning
    if role == "tool" and "tool_call_id" in message:
        entry["tool_call_id"] = message["tool_call_id"]
    for key in ("name", "task"):
        if isinstance(message.get(key), str):
            entry[key] = message[key]
    return entry


def conversation(
    messages: list[Mapping[str, Any]], content_format: ContentFormat
) -> list[dict[str, Any]]:
    """The conversation vLLM hands the chat template; ``Unsupported`` if the gateway cannot
    make it exactly."""
    return [_message(m, content_format) for m in messages]


def template_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments vLLM renders the template with (besides tools), in its order of
    precedence: the request's ``chat_template_kwargs``, overridden by its own fields."""
    user = body.get("chat_template_kwargs") or {}
    if not isinstance(user, dict):
        raise Unsupported("chat_template_kwargs that is not an object")
    if {"chat_template", "tokenize"} & user.keys():
        raise Unsupported("chat_template_kwargs that vLLM refuses")
    generation = body.get("add_generation_prompt", True)
    continuing = body.get("continue_final_message", False)
    if not isinstance(generation, bool) or not isinstance(continuing, bool):
        raise Unsupported("template flags that are not booleans")
    if generation and continuing:
        raise Unsupported("add_generation_prompt with continue_final_message (vLLM's 400)")
    options = {k: v for k, v in user.items() if v is not None and v != "auto"}
    options.update(add_generation_prompt=generation, continue_final_message=continuing)
    for name in _TEMPLATE_OPTIONS:
        if body.get(name) is not None:
            options[name] = body[name]
    effort = body.get("reasoning_effort")
    if effort is not None and "enable_thinking" not in user:
        options["enable_thinking"] = effort != "none"
    return options


def render(
    tokenizer: Any,
    template: str,
    content_format: ContentFormat | None,
    body: Mapping[str, Any],
    tools: list[dict[str, Any]] | None,
) -> str:
    """The prompt text of a chat request. ``content_format`` None: the template's is unknown,
    so the text is rendered both ways, and must come out the same (``Unsupported`` if not)."""
    for name in UNRENDERED_FIELDS:
        if body.get(name) is not None:
            raise Unsupported(f"the {name} field")
    options = template_options(body)
    messages = body.get("messages") or []
    formats: tuple[ContentFormat, ...] = (
        (content_format,) if content_format is not None else ("string", "openai")
    )
    texts = {
        tokenizer.apply_chat_template(
            conversation(messages, fmt),
            tools=tools,
            chat_template=template,
            tokenize=False,
            return_dict=False,
            **options,
        )
        for fmt in formats
    }
    if len(texts) != 1:
        raise Unsupported("a template whose content format the gateway cannot tell")
    return str(texts.pop())


def _mentions_content(node: Any) -> bool:
    """Whether an expression reads anything called ``content`` (a name, an attribute or a
    constant key)."""
    from jinja2 import nodes

    for child in (node, *node.find_all(nodes.Node)):
        if isinstance(child, nodes.Name) and child.name == "content":
            return True
        if isinstance(child, nodes.Getattr) and child.attr == "content":
            return True
        if isinstance(child, nodes.Const) and child.value == "content":
            return True
    return False


def _loops(tree: Any) -> Iterator[tuple[Any, bool]]:
    """Every ``for`` loop of the template, and whether it sits inside a macro."""
    from jinja2 import nodes

    macros = tree.find_all(nodes.Macro)
    in_macros = {id(loop) for macro in macros for loop in macro.find_all(nodes.For)}
    for loop in tree.find_all(nodes.For):
        yield loop, id(loop) in in_macros


def content_format(template: str) -> ContentFormat | None:
    """``"string"`` when the template certainly reads message contents as strings (no loop
    iterates over anything called content, and no macro loops over its arguments), which is
    then also what vLLM's detection finds; None when it might iterate over content parts
    (``render`` then checks that both ways give the same text)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        tree = _compile_jinja_template(template).environment.parse(template)
    except Exception:
        return None
    for loop, in_macro in _loops(tree):
        if in_macro or _mentions_content(loop.iter):
            return None
    return "string"
