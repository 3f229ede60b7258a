"""What every request handler of the gateway shares: its services and admission control.

The gateway's modules import in one direction: services (``control_plane``, ``upstream``,
``kv_client``, ``metrics``) → this context → ``session`` (one client request, and the
registry of live sessions) → ``migration`` (moves sessions) → ``app`` (wires them together).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.errors import APIError
from pdserve.gateway.kv_client import KVControlClient
from pdserve.gateway.metrics import GatewayMetrics, Refusal
from pdserve.gateway.openai_api import ChatRequest, CompletionRequest, Kind
from pdserve.gateway.phases import RecentRequests
from pdserve.gateway.settings import GatewaySettings
from pdserve.gateway.tokens import Agreement, Counted, Tokenizers
from pdserve.gateway.upstream import Upstream
from pdserve.scheduler.admission import TtftPredictor, Verdict
from pdserve.scheduler.slo import SloSettings
from pdserve.scheduler.snapshot import RequestEstimate


class Admission:
    """At most ``max_inflight`` requests at once, ``max_queued`` more waiting, others 429."""

    def __init__(
        self, max_inflight: int, max_queued: int, on_refuse: Callable[[], object] = lambda: None
    ) -> None:
        self._slots = asyncio.Semaphore(max_inflight)
        self.max_queued = max_queued
        self.inflight = 0
        self.queued = 0
        self.on_refuse = on_refuse

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.queued >= self.max_queued:
            self.on_refuse()
            raise APIError(
                429, "the cluster is at capacity; retry shortly", headers={"Retry-After": "1"}
            )
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self._slots.release()


class SloShedding:
    """``--shed-over-slo``: the lowest priority class is refused (429 + Retry-After) while
    no instance is predicted to meet its TTFT SLO, so that a backlog it cannot escape does
    not also delay the requests that matter more. Off by default: refusing is the
    operator's choice."""

    def __init__(
        self, settings: GatewaySettings, predictor: TtftPredictor, slo: SloSettings
    ) -> None:
        self.enabled = settings.shed_over_slo
        # In the policies' convention (higher is more important): vLLM's value, negated.
        self.lowest_class = -settings.shed_priority
        self.predictor = predictor
        self.slo = slo

    def check(self, control: ControlPlane, estimate: RequestEstimate) -> None:
        """Raises the 429 of a request to shed; returns for every other."""
        if not self.enabled or estimate.priority > self.lowest_class:
            return
        judged = self.predictor.admit(control.snapshot(), estimate, self.slo.ttft_s(estimate))
        if judged.verdict is Verdict.REFUSE:
            raise APIError(
                429,
                f"no instance is predicted to meet this request's TTFT SLO (best "
                f"{judged.predicted_ttft_s:.1f} s); low-priority requests are shed until "
                "the queues drain",
                headers={"Retry-After": str(judged.retry_after_s)},
            )


class GatewayContext:
    def __init__(
        self,
        settings: GatewaySettings,
        control: ControlPlane,
        upstream: Upstream,
        kv: KVControlClient,
        metrics: GatewayMetrics,
        shedding: SloShedding,
    ) -> None:
        self.settings = settings
        self.control = control
        self.upstream = upstream
        self.kv = kv
        self.metrics = metrics
        self.admission = Admission(
            settings.max_inflight,
            settings.max_queued,
            metrics.refused.labels(Refusal.QUEUE_FULL).inc,
        )
        self.shedding = shedding
        self.tokens = Tokenizers(
            settings.prompt_tokenizer, settings.prompt_tokenizer_threads, self._checked
        )
        self.recent = RecentRequests(settings.recent_requests)

    def _checked(self, kind: Kind, agreement: Agreement) -> None:
        self.metrics.tokenizer_checks.labels(kind, agreement.value).inc()

    async def preload_tokenizers(self, every_s: float = 1.0) -> None:
        """Loads each tokenizer instances register as soon as they join (runs until
        cancelled, with the gateway)."""
        while True:
            for record in list(self.control.instances.values()):
                self.tokens.preload(record.info.tokenizer or None)
            await asyncio.sleep(every_s)

    async def count_prompt(
        self, kind: Kind, request: ChatRequest | CompletionRequest, model: str
    ) -> Counted:
        """The request's prompt tokens, with the tokenizer the model's instances registered
        and its context length (the smallest any of them serves)."""
        infos = [r.info for r in self.control.instances.values() if r.info.model == model]
        registered = next((i.tokenizer for i in infos if i.tokenizer), None)
        chat_default = all(i.chat_template_default for i in infos if i.tokenizer)
        limit = min((i.max_model_len for i in infos if i.max_model_len > 0), default=0)
        counted = await self.tokens.count(kind, request, registered, limit, chat_default)
        self.metrics.prompt_counts.labels(counted.method.value, counted.fallback.value).inc()
        return counted

    def admit(self, estimate: RequestEstimate) -> None:
        """Admission control before a request takes a slot: its refusals are counted."""
        try:
            self.shedding.check(self.control, estimate)
        except APIError:
            self.metrics.refused.labels(Refusal.OVER_SLO).inc()
            raise

    def default_model(self) -> str:
        models = self.control.models()
        return next(iter(models), "default")
