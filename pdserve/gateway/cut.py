"""Why a session's current leg was cut (failover or migration), and how it goes on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from pdserve.kv.messages import Pinned


@dataclass
class Cut:
    """Why the current leg was cut, and how to go on.

    A migration names its target and, if the request had KV worth moving, the live export
    on the instance it leaves (``Pinned``); ``done`` is set once the target has produced its
    first token (``downtime_s`` is then the stream's gap) or the move failed (``error``).

    ``leg``: the leg a migration was planned against; once the request failed over to
    another leg, that plan (and its pin on the instance left) is stale and the cut refused.
    ``failed_over``: a failover overtook the migration before its new leg started.
    """

    reason: Literal["failover", "migration"]
    target: str | None = None
    export: Pinned | None = None
    transfer_id: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    downtime_s: float | None = None
    error: str | None = None
    last_token_at: float | None = None
    leg: int | None = None
    failed_over: bool = False
    # The session went on to the target (a migration cut waits for the leg's next token,
    # and the request may finish first).
    taken: bool = False

    def finish(self, error: str | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()
