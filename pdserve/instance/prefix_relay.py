"""Relays this instance's prefix-cache changes (vLLM's KV events) to the gateway, signed.

vLLM publishes ``KVEventBatch`` messages (``BlockStored`` / ``BlockRemoved`` /
``AllBlocksCleared``) on a ZeroMQ PUB socket with no authentication at all, so it is never
exposed: ``pdserve instance`` gives vLLM ``--kv-events-config`` with a loopback endpoint
(``kv_events_config``), which vLLM's publisher *connects* to (an endpoint without ``*``),
and this relay, in the API server's process next to the registration agent, binds it with a
SUB socket before the engine starts. Frames are decoded with msgpack into structs of our
own (never pickle; unknown fields and unknown event kinds are skipped, so a newer vLLM's
additions do not break it).

For each stored run the relay computes pdserve's chain keys (``pdserve.protocol.prefix``)
from the run's token ids and its parent's key, and every ``FLUSH_S`` sends what changed as
one ``PrefixEvents`` batch in the HMAC envelope of the load reports, numbered from 1. It
keeps the instance's hash → key map, so it can send a *full picture* (every cached block and
its key; ``PrefixEvents.full``) whenever the gateway may have lost track: when its socket
(re)connects to the gateway (a gateway that restarted) and after a batch could not be
queued. It skips blocks the gateway could not match from token ids alone (LoRA adapters,
multimodal or salted blocks with extra keys, other KV cache groups, offloaded tiers), and
vLLM's partial prefix entries (smaller than the cache block).

Lost vLLM frames (the sequence numbers skip, which a loopback SUB socket with a large
high-water mark should never see) leave the relay unsure of what is cached: it drops its
map and sends an empty full picture; the index refills from the events that follow.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve.logs import get_logger
from pdserve.protocol.prefix import (
    BlockKeys,
    Cleared,
    PrefixEvent,
    PrefixEvents,
    Removed,
    Stored,
    external_hash,
)
from pdserve.protocol.reports import ControlMessage
from pdserve.protocol.wire import Codec

logger = get_logger(__name__)

TOPIC = "pdserve-kv"
# Seconds between batches to the gateway (vLLM publishes once per engine step).
FLUSH_S = 0.02
# Blocks per batch of a full picture.
FULL_CHUNK = 1 << 16
# Frames vLLM's publisher may have queued for us before any is dropped.
RECEIVE_HWM = 100_000
_MEDIA = (None, "GPU")


def kv_events_config(port: int) -> str:
    """vLLM's ``--kv-events-config``: publish to this relay on loopback only."""
    return json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://127.0.0.1:{port}",
            "topic": TOPIC,
        }
    )


class _BlockStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class _BlockRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class _AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_VllmEvent = _BlockStored | _BlockRemoved | _AllBlocksCleared
_batch_decoder = msgspec.msgpack.Decoder(_Batch)
_event_decoder = msgspec.msgpack.Decoder(_VllmEvent)


def decode_batch(payload: bytes) -> list[_VllmEvent] | None:
    """The events of one vLLM frame (unknown kinds skipped); None if it is not a batch."""
    try:
        batch = _batch_decoder.decode(payload)
    except msgspec.DecodeError:
        return None
    events: list[_VllmEvent] = []
    for raw in batch.events:
        try:
            events.append(_event_decoder.decode(raw))
        except msgspec.DecodeError:
            continue
    return events


def _plain(event: _BlockStored) -> bool:
    """Blocks named by their token ids alone, in the one KV cache group, on the device."""
    return (
        event.medium in _MEDIA
        and event.group_idx in (None, 0)
        and event.lora_id is None
        and event.lora_name is None
        and not (event.extra_keys and any(k is not None for k in event.extra_keys))
    )


class PrefixRelay:
    """Turns vLLM's events into signed ``PrefixEvents`` (module docstring). ``apply`` and
    ``batches`` are the whole logic, without sockets; ``start`` runs them on a thread."""

    def __init__(self, instance_id: str, incarnation: str) -> None:
        self.instance_id = instance_id
        self.incarnation = incarnation
        self.keys = BlockKeys()
        self.block_size = 0
        self.need_full = True  # the first batch a gateway sees is a full picture
        self._pending: list[PrefixEvent] = []
        self._seq = 0
        self._vllm_seq: int | None = None
        self.lost_frames = 0

    # --- vLLM's side --------------------------------------------------------------------------

    def receive(self, seq: int, payload: bytes) -> None:
        """One frame of vLLM's publisher (its sequence number, from 0, and its batch)."""
        if self._vllm_seq is not None and seq != self._vllm_seq + 1:
            self.lost_frames += 1
            logger.warning(
                "pdserve: lost vLLM KV events %d..%d; the gateway's index restarts",
                self._vllm_seq + 1,
                seq - 1,
            )
            self._restart()
        self._vllm_seq = seq
        events = decode_batch(payload)
        if events is None:
            logger.warning("pdserve: undecodable KV event batch %d skipped", seq)
            return
        for event in events:
            self.apply(event)

    def _restart(self) -> None:
        self.keys.clear()
        self._pending = []
        self.need_full = True

    def apply(self, event: _VllmEvent) -> None:
        if isinstance(event, _BlockStored):
            self._stored(event)
        elif isinstance(event, _BlockRemoved):
            if event.medium in _MEDIA and event.group_idx in (None, 0):
                hashes = [external_hash(h) for h in event.block_hashes]
                known = [h for h in hashes if h in self.keys]
                if known:
                    self.keys.remove(known)
                    self._pending.append(Removed(known))
        else:
            self.keys.clear()
            self._pending.append(Cleared())

    def _stored(self, event: _BlockStored) -> None:
        if not _plain(event) or event.block_size < self.block_size:
            return
        if event.block_size > self.block_size:
            # The cache block is the largest any event carries: smaller ones were partial.
            if len(self.keys):
                self._restart()
            self.block_size = event.block_size
        hashes = [external_hash(h) for h in event.block_hashes]
        parent = None if event.parent_block_hash is None else external_hash(event.parent_block_hash)
        keys = self.keys.resolve(hashes, parent, event.token_ids, event.block_size)
        if keys is None:
            return
        if len(self.keys) + len(keys) > self.keys.max_blocks:
            self.need_full = True  # the map drops its oldest: the gateway must too
        self.keys.add(hashes, keys)
        self._pending.append(Stored(hashes, keys))

    # --- the gateway's side -------------------------------------------------------------------

    def batches(self) -> list[PrefixEvents]:
        """What to send now (numbered; taken: not returned again). A full picture, in
        chunks, when ``need_full``; else the changes since the last call, if any."""
        if self.need_full:
            self.need_full = False
            self._pending = []
            items = list(self.keys.items())
            out = []
            for start in range(0, max(1, len(items)), FULL_CHUNK):
                chunk = items[start : start + FULL_CHUNK]
                stored = Stored([h for h, _ in chunk], [k for _, k in chunk])
                out.append(self._batch([stored] if chunk else [], full=start == 0))
            return out
        if not self._pending:
            return []
        events, self._pending = self._pending, []
        return [self._batch(events, full=False)]

    def _batch(self, events: list[PrefixEvent], full: bool) -> PrefixEvents:
        self._seq += 1
        return PrefixEvents(
            self.instance_id, self.incarnation, self._seq, self.block_size, events, full=full
        )


class RelayThread:
    """The relay's sockets and thread: SUB bound on loopback for vLLM, PUSH to the gateway
    (watched: each new connection to a gateway gets a full picture)."""

    def __init__(self, relay: PrefixRelay, port: int, control_address: str, secret: bytes) -> None:
        self.relay = relay
        self._codec: Codec[Any] = Codec(ControlMessage, secret)
        self._sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        self._sub.bind(f"tcp://127.0.0.1:{port}")
        self._push: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 1000)
        self._monitor: zmq.Socket[bytes] = self._push.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
        )
        self._push.connect(control_address)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-prefix-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        next_flush = time.monotonic() + FLUSH_S
        while not self._stopped.is_set():
            try:
                wait_ms = int(max(0.0, next_flush - time.monotonic()) * 1e3)
                for socket, _ in poller.poll(wait_ms):
                    if socket is self._sub:
                        self._drain()
                    else:
                        recv_monitor_message(self._monitor)
                        self.relay.need_full = True
                if time.monotonic() >= next_flush:
                    self._flush()
                    next_flush = time.monotonic() + FLUSH_S
            except zmq.ContextTerminated:
                return
            except Exception:
                logger.exception("pdserve: relaying KV events failed")

    def _drain(self) -> None:
        for _ in range(1000):
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 3 and frames[0] == TOPIC.encode() and len(frames[1]) == 8:
                self.relay.receive(int.from_bytes(frames[1], "big", signed=True), frames[2])

    def _flush(self) -> None:
        for batch in self.relay.batches():
            try:
                self._push.send_multipart(self._codec.encode(batch), flags=zmq.NOBLOCK)
            except zmq.Again:
                self.relay.need_full = True  # the gateway is away or slow: start again whole
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        self._push.disable_monitor()
        for socket in (self._monitor, self._sub, self._push):
            socket.close(linger=0)
