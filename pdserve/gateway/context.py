"""What every request handler of the gateway shares: services, sessions, admission control."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.errors import APIError
from pdserve.gateway.kv_client import KVControlClient
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.settings import GatewaySettings
from pdserve.gateway.upstream import Upstream

if TYPE_CHECKING:
    from pdserve.gateway.migration import Migrator
    from pdserve.gateway.session import RequestSession


@dataclass
class SessionRegistry:
    """Sessions by the instance currently serving them (for failover, drain, migration)."""

    by_instance: dict[str, set[RequestSession]] = field(default_factory=dict)
    where: dict[RequestSession, str] = field(default_factory=dict)

    def attach(self, session: RequestSession, instance_id: str) -> None:
        self.detach(session)
        self.by_instance.setdefault(instance_id, set()).add(session)
        self.where[session] = instance_id

    def detach(self, session: RequestSession) -> None:
        instance_id = self.where.pop(session, None)
        if instance_id is not None:
            sessions = self.by_instance.get(instance_id)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del self.by_instance[instance_id]

    def on(self, instance_id: str) -> list[RequestSession]:
        return list(self.by_instance.get(instance_id, ()))

    def find(self, key: str) -> RequestSession | None:
        for session in self.where:
            if session.key == key:
                return session
        return None


class Admission:
    """At most ``max_inflight`` requests at once, ``max_queued`` more waiting, others 429."""

    def __init__(self, max_inflight: int, max_queued: int) -> None:
        self._slots = asyncio.Semaphore(max_inflight)
        self.max_queued = max_queued
        self.inflight = 0
        self.queued = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.queued >= self.max_queued:
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


class GatewayContext:
    def __init__(
        self,
        settings: GatewaySettings,
        control: ControlPlane,
        upstream: Upstream,
        kv: KVControlClient,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.control = control
        self.upstream = upstream
        self.kv = kv
        self.metrics = metrics
        self.sessions = SessionRegistry()
        self.admission = Admission(settings.max_inflight, settings.max_queued)
        self.migrator: Migrator | None = None

    def default_model(self) -> str:
        models = self.control.models()
        return next(iter(models), "default")
