"""What a client asks about its *prompt* that the gateway's streamed legs cannot return:
``echo`` (the prompt's text before the completion) and ``prompt_logprobs`` without streaming.

The gateway always streams from instances, and vLLM refuses ``prompt_logprobs`` on a stream;
a disaggregated decode leg gets its prompt as token ids, whose echo vLLM does not return as
the client's text. So both are taken off the streamed legs and supplied here:

- the prompt logprobs come from a non-streamed leg over the prompt: the prefill leg when
  there is one, else one extra ``max_tokens=1`` request to the decode instance itself, whose
  KV then stays in that instance's prefix cache for the decode leg;
- the echoed text is the client's prompt string, or, for a token-id prompt, the instance's
  ``/detokenize`` of it (what vLLM echoes), put before the first text the client gets.

Not supplied: logprobs of the echoed prompt tokens (vLLM adds them to ``logprobs`` when
``echo`` and ``logprobs`` are both set).
"""

from __future__ import annotations

from typing import Any

from pdserve.gateway.context import GatewayContext
from pdserve.gateway.errors import APIError
from pdserve.gateway.openai_api import ENDPOINTS, CompletionRequest, Kind
from pdserve.gateway.upstream import UpstreamBroken

# Fields a streamed leg must not carry (the gateway answers them itself).
LEG_EXCLUDED = ("echo", "prompt_logprobs")


class PromptExtras:
    def __init__(self, kind: Kind, request: Any, client_stream: bool) -> None:
        self.kind = kind
        asked = getattr(request, "prompt_logprobs", None)
        if asked is None and request.model_extra:
            asked = request.model_extra.get("prompt_logprobs")
        # A stream asking for them is vLLM's own 400, from the leg: left to the leg.
        self.wants_logprobs = bool(asked) and not client_stream
        self.echo = isinstance(request, CompletionRequest) and request.echo
        self.prompt = request.prompt if isinstance(request, CompletionRequest) else None
        self.prompt_logprobs: Any = None
        self._echo_text: str | None = None

    @property
    def active(self) -> bool:
        return self.wants_logprobs or self.echo

    def strip(self, body: dict[str, Any]) -> None:
        """Takes the fields off a streamed leg's body (when the gateway supplies them)."""
        if self.wants_logprobs:
            body.pop("prompt_logprobs", None)
        if self.echo:
            body.pop("echo", None)

    def capture(self, answer: dict[str, Any]) -> None:
        """Keeps the prompt logprobs of a non-streamed answer over the prompt."""
        if not self.wants_logprobs:
            return
        if self.kind == "chat":
            self.prompt_logprobs = answer.get("prompt_logprobs")
        else:
            choices = answer.get("choices") or [{}]
            self.prompt_logprobs = choices[0].get("prompt_logprobs")

    async def prepare(
        self,
        ctx: GatewayContext,
        url: str,
        base_body: dict[str, Any],
        headers: dict[str, str],
    ) -> None:
        """Before the first streamed leg, on instance ``url``: what ``capture`` and the echo
        still lack. Raises APIError as the instance does (a bad request is the client's)."""
        if self.wants_logprobs and self.prompt_logprobs is None:
            body = {**base_body, "max_tokens": 1, "stream": False}
            body.pop("echo", None)
            for name in ("max_completion_tokens", "min_tokens", "stop"):
                body.pop(name, None)
            self.capture(await _post(ctx, url + ENDPOINTS[self.kind], body, headers))
        if self.echo and self._echo_text is None:
            if isinstance(self.prompt, str):
                self._echo_text = self.prompt
            else:
                body = {"model": base_body["model"], "tokens": self.prompt}
                answer = await _post(ctx, url + "/detokenize", body, headers)
                self._echo_text = str(answer.get("prompt", ""))

    def decorate(self, choice: dict[str, Any]) -> None:
        """Puts the echoed prompt before the first text chunk the client gets."""
        if self._echo_text is not None and "text" in choice:
            choice["text"] = self._echo_text + (choice.get("text") or "")
            self._echo_text = None

    def add_to(self, body: dict[str, Any], choice: dict[str, Any]) -> None:
        """Puts the prompt logprobs where vLLM does in a non-streamed answer."""
        if self.prompt_logprobs is None:
            return
        if self.kind == "chat":
            body["prompt_logprobs"] = self.prompt_logprobs
        else:
            choice["prompt_logprobs"] = self.prompt_logprobs


async def _post(
    ctx: GatewayContext, url: str, body: dict[str, Any], headers: dict[str, str]
) -> dict[str, Any]:
    try:
        return await ctx.upstream.post_json(url, body, headers)
    except UpstreamBroken as e:
        raise APIError(502, f"the instance did not answer: {e}") from None
