"""A KV worker tells the gateway what it holds, itself, whenever that changes.

Load reports are built after engine steps, and an idle engine takes none: a pull that ended
after the last step would look in flight forever. So each worker pushes its ``KVHoldings``
(exports, pairs, transfers running) straight to the gateway's control plane, at most once
per report interval when they change and once a second anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pdserve.kv.settings import KVSettings
from pdserve.protocol.push import PeriodicPusher
from pdserve.protocol.reports import HoldingsReport, KVHoldings

RESEND_EVERY_S = 1.0


class HoldingsReporter:
    """A daemon thread of the worker process; ``stop`` ends it (at shutdown)."""

    def __init__(
        self, settings: KVSettings, rank: int, read: Callable[[], KVHoldings], secret: bytes
    ) -> None:
        assert settings.control_address is not None
        self._settings = settings
        self._rank = rank
        self._read = read
        self._sent: KVHoldings | None = None
        self._sent_at = 0.0
        self._pusher = PeriodicPusher(
            settings.control_address,
            secret,
            settings.report_interval_s,
            self._next_report,
            name="pdserve-kv-holdings",
        )

    def _next_report(self) -> HoldingsReport | None:
        """A report when the holdings changed, or a second has passed (reporter thread)."""
        holdings = self._read()
        now = time.monotonic()
        if holdings == self._sent and now - self._sent_at < RESEND_EVERY_S:
            return None
        self._sent, self._sent_at = holdings, now
        return HoldingsReport(
            instance_id=self._settings.instance_id,
            rank=self._rank,
            incarnation=self._settings.incarnation,
            holdings=holdings,
        )

    def stop(self) -> None:
        self._pusher.stop()
