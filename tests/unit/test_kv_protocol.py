"""The KV protocol's version handshake, typed failures and shared structs (no second process)."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from typing import Any, Literal

import msgspec
import pytest
import torch

from pdserve.kv.layout import build_layout
from pdserve.kv.messages import (
    Failed,
    KVError,
    KVFailure,
    KVTimeout,
    PairOpen,
    PairOpened,
    StoreSet,
    failure_of,
)
from pdserve.kv.messenger import Messenger, kv_codec
from pdserve.kv.metadata import PROTOCOL_VERSION
from pdserve.kv.settings import KVSettings
from pdserve.kv.transport import wait_all
from pdserve.kv.worker_side import KVWorker
from pdserve.protocol.net import free_port
from pdserve.protocol.reports import TransferCounters

SECRET = b"protocol-test"


def worker(cache_width: int = 8) -> KVWorker:
    caches = {f"layers.{i}": torch.zeros(4, 2, cache_width) for i in range(2)}
    settings = KVSettings(instance_id="w", port=free_port(), pair_setup_timeout_s=2.0)
    return KVWorker(settings, build_layout(caches, 4), 0, SECRET)


def client() -> Messenger:
    return Messenger(kv_codec(SECRET), None, on_request=lambda i, m: None, on_store_set=print)


def ask(messenger: Messenger, address: str, make: Any) -> Any:
    rid, box = messenger.new_request()
    try:
        messenger.send(address, make(rid))
        return box.get(timeout=10)
    finally:
        messenger.forget(rid)


def test_a_peer_of_another_protocol_version_is_refused_naming_both() -> None:
    server, messenger = worker(), client()
    try:
        reply = ask(
            messenger,
            server.address,
            lambda rid: PairOpen(
                rid=rid,
                pair_id="old.0.x",
                backend="gloo",
                plane_digest=server.layout.plane_digest,
                protocol=PROTOCOL_VERSION + 1,
            ),
        )
        assert isinstance(reply, Failed) and reply.code is KVFailure.PROTOCOL_MISMATCH
        assert f"version {PROTOCOL_VERSION + 1}" in reply.error
        assert f"version {PROTOCOL_VERSION}" in reply.error
    finally:
        messenger.stop()
        server.shutdown()


def test_a_peer_with_other_planes_is_refused() -> None:
    server, messenger = worker(), client()
    try:
        reply = ask(
            messenger,
            server.address,
            lambda rid: PairOpen(
                rid=rid,
                pair_id="p.0.x",
                backend="gloo",
                plane_digest="not-these-planes",
                protocol=PROTOCOL_VERSION,
            ),
        )
        assert isinstance(reply, Failed) and reply.code is KVFailure.PLANE_MISMATCH
    finally:
        messenger.stop()
        server.shutdown()


class _OldPairOpen(msgspec.Struct, tag="PairOpen", frozen=True):
    """A PairOpen as workers sent it before the protocol had a version."""

    rid: int
    pair_id: str
    backend: Literal["gloo", "nccl"]
    layout: str


def test_a_pair_open_from_before_versioning_reads_as_version_0_and_is_refused() -> None:
    old = msgspec.msgpack.encode(_OldPairOpen(rid=1, pair_id="p", backend="gloo", layout="x"))
    message = msgspec.msgpack.decode(old, type=PairOpen)
    assert message.protocol == 0
    server, messenger = worker(), client()
    try:
        reply = ask(
            messenger,
            server.address,
            lambda rid: PairOpen(rid=rid, pair_id="p", backend="gloo", plane_digest="x"),
        )
        assert isinstance(reply, Failed) and reply.code is KVFailure.PROTOCOL_MISMATCH
        assert "version 0" in reply.error
    finally:
        messenger.stop()
        server.shutdown()


def test_the_initiator_refuses_a_server_of_another_version() -> None:
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    address = f"tcp://127.0.0.1:{free_port()}"

    def on_request(identity: bytes, message: Any) -> None:
        answers.put(message)
        server.reply(identity, PairOpened(rid=message.rid, protocol=PROTOCOL_VERSION + 1))

    def ignore(message: StoreSet) -> None:
        pass

    server = Messenger(kv_codec(SECRET), address, on_request=on_request, on_store_set=ignore)
    importer = worker()
    try:
        with pytest.raises(KVError) as raised:
            importer._pair_with(address, time.monotonic() + 5)
        assert raised.value.failure is KVFailure.PROTOCOL_MISMATCH
        assert f"version {PROTOCOL_VERSION + 1}" in str(raised.value)
        sent = answers.get(timeout=5)
        assert isinstance(sent, PairOpen) and sent.protocol == PROTOCOL_VERSION
        assert sent.plane_digest == importer.layout.plane_digest
    finally:
        importer.shutdown()
        server.stop()


# --- typed failures --------------------------------------------------------------------------


class _Work:
    def __init__(self, sleep_s: float = 0.0, error: bool = False, result: bool = True):
        self.sleep_s, self.error, self.result = sleep_s, error, result

    def wait(self, timeout: Any) -> bool:
        time.sleep(min(self.sleep_s, timeout.total_seconds()))
        if self.error:
            raise RuntimeError("some backend text that nobody should parse")
        return self.result


def test_a_wait_that_uses_up_its_deadline_is_a_timeout() -> None:
    with pytest.raises(KVTimeout) as raised:
        wait_all([_Work(sleep_s=1.0, error=True)], time.monotonic() + 0.05)
    assert isinstance(raised.value, TimeoutError)
    assert failure_of(raised.value) is KVFailure.TIMEOUT


def test_a_wait_that_fails_early_is_a_transport_error() -> None:
    with pytest.raises(KVError) as raised:
        wait_all([_Work(), _Work(error=True)], time.monotonic() + 5)
    assert not isinstance(raised.value, TimeoutError)
    assert raised.value.failure is KVFailure.TRANSPORT_ERROR


def test_a_wait_that_returns_false_or_starts_late_is_a_timeout() -> None:
    with pytest.raises(KVTimeout):
        wait_all([_Work(result=False)], time.monotonic() + 5)
    with pytest.raises(KVTimeout):
        wait_all([_Work()], time.monotonic() - 1)
    wait_all([_Work(), _Work()], time.monotonic() + 5)  # all done in time: no error


def test_failure_of_maps_exceptions_to_codes() -> None:
    assert failure_of(KVError(KVFailure.RELEASED, "x")) is KVFailure.RELEASED
    assert failure_of(TimeoutError()) is KVFailure.TIMEOUT
    assert failure_of(RuntimeError("Timed out")) is KVFailure.TRANSPORT_ERROR


def test_failed_carries_its_code_over_the_wire() -> None:
    codec = kv_codec(SECRET)
    failed = Failed(rid=3, code=KVFailure.LEASE_EXPIRED, error="the lease expired")
    decoded = codec.decode(codec.encode(failed))
    assert decoded == failed and decoded.code is KVFailure.LEASE_EXPIRED
    assert str(KVFailure.LEASE_EXPIRED) == "lease_expired"  # the stable code


# --- shared structs ----------------------------------------------------------------------------


def test_transfer_counters_add_field_by_field() -> None:
    a = TransferCounters(loads_ok=1, load_seconds=0.5, leases_expired=2)
    b = TransferCounters(loads_ok=2, bytes_sent=7, load_seconds=0.25)
    total = a + b
    assert total == TransferCounters(loads_ok=3, bytes_sent=7, load_seconds=0.75, leases_expired=2)
    assert TransferCounters().is_zero() and not total.is_zero()


def test_the_scheduler_side_imports_neither_torch_nor_vllm() -> None:
    code = (
        "import sys, pdserve.kv.scheduler_side, pdserve.kv.metadata, pdserve.kv.exports; "
        "print(sorted({'torch', 'vllm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
