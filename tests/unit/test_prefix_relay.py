"""The instance's relay of vLLM's KV events (``instance.prefix_relay``): vLLM's own structs and
publisher in, signed ``PrefixEvents`` out, and the keys match what the gateway computes."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import pytest
import zmq
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)

from pdserve.instance import prefix_relay
from pdserve.instance.launch import events_port_for, kv_settings_for, vllm_argv
from pdserve.instance.prefix_relay import TOPIC, PrefixRelay, RelayThread, kv_events_config
from pdserve.instance.settings import InstanceSettings
from pdserve.protocol.net import free_port
from pdserve.protocol.prefix import Cleared, PrefixEvents, Removed, Stored
from pdserve.protocol.reports import ControlMessage
from pdserve.protocol.wire import Codec
from pdserve.scheduler.prefix_index import PrefixIndex

BS = 4
TOKENS = list(range(500, 516))  # 4 blocks
SECRET = b"relay-test"


def block(
    hashes: list[Any], parent: Any, tokens: list[int], block_size: int = BS, **extra: Any
) -> BlockStored:
    fields: dict[str, Any] = {"lora_id": None, "medium": "GPU", "lora_name": None, **extra}
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=block_size,
        **fields,
    )


def frame(*events: Any) -> bytes:
    return msgspec.msgpack.encode(KVEventBatch(ts=time.time(), events=list(events)))


def relay() -> PrefixRelay:
    r = PrefixRelay("p", "inc")
    assert [b.full for b in r.batches()] == [True]  # a gateway first gets a (empty) picture
    return r


def index_of(batches: list[PrefixEvents]) -> PrefixIndex:
    index = PrefixIndex()
    for batch in batches:
        for event in batch.events:
            if isinstance(event, Stored):
                index.stored_keys("p", event.hashes, event.keys, batch.block_size)
            elif isinstance(event, Removed):
                index.removed("p", event.hashes)
    return index


def test_stored_blocks_get_the_keys_the_gateway_computes_from_the_prompt() -> None:
    r = relay()
    sha = [bytes([i]) * 32 for i in range(4)]
    r.receive(0, frame(block(sha[:2], None, TOKENS[:8])))
    r.receive(1, frame(block(sha[2:], sha[1], TOKENS[8:])))
    (batch,) = r.batches()
    assert (batch.seq, batch.block_size, batch.full) == (2, BS, False)
    assert index_of([batch]).match([*TOKENS, 1], BS, now=0.0).tokens("p") == 16
    assert r.batches() == []  # nothing new


def test_removals_of_known_blocks_and_clears_are_passed_on() -> None:
    r = relay()
    r.receive(0, frame(block([1, 2], None, TOKENS[:8])))
    r.receive(1, frame(BlockRemoved(block_hashes=[2, 99], medium="GPU"), AllBlocksCleared()))
    (batch,) = r.batches()
    assert batch.events[1:] == [Removed([2]), Cleared()]
    assert len(r.keys) == 0


@pytest.mark.parametrize(
    "extra",
    [
        {"lora_id": 1},
        {"lora_name": "adapter"},
        {"medium": "CPU"},
        {"group_idx": 1},
        {"extra_keys": [("salt",)]},
    ],
)
def test_blocks_not_named_by_their_tokens_alone_are_skipped(extra: dict[str, Any]) -> None:
    r = relay()
    r.receive(0, frame(block([1], None, TOKENS[:4], **extra)))
    r.receive(1, frame(block([2], 1, TOKENS[4:8])))  # its parent was skipped: so is it
    assert r.batches() == []


def test_partial_entries_smaller_than_the_cache_block_are_skipped() -> None:
    r = relay()
    r.receive(0, frame(block([1], None, TOKENS[:4])))
    r.receive(1, frame(block([2], 1, TOKENS[4:6], block_size=2)))
    (batch,) = r.batches()
    assert batch.events == [Stored([1], batch.events[0].keys)]  # type: ignore[union-attr]


def test_lost_vllm_frames_restart_the_picture() -> None:
    r = relay()
    r.receive(0, frame(block([1], None, TOKENS[:4])))
    r.receive(2, frame(block([3], None, TOKENS[4:8])))  # frame 1 never came
    batches = r.batches()
    assert r.lost_frames == 1
    assert batches[0].full and index_of(batches).match(TOKENS, BS, now=0.0).tokens("p") == 0


def test_unknown_event_kinds_and_fields_are_skipped() -> None:
    r = relay()
    unknown = {"type": "SomethingNew", "x": 1}
    stored = msgspec.to_builtins(block([1], None, TOKENS[:4])) | {"new_field": 3}
    stored["type"] = "BlockStored"
    r.receive(0, msgspec.msgpack.encode([1.0, [unknown, stored]]))
    (batch,) = r.batches()
    assert len(batch.events) == 1
    r.receive(1, b"\xc1 not msgpack")
    assert r.batches() == []


def test_a_full_picture_comes_in_chunks_numbered_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefix_relay, "FULL_CHUNK", 2)
    r = relay()
    r.receive(0, frame(block([1, 2, 3], None, TOKENS[:12])))
    r.batches()
    r.need_full = True
    batches = r.batches()
    assert [(b.seq, b.full) for b in batches] == [(3, True), (4, False)]
    assert index_of(batches).match(TOKENS, BS, now=0.0).tokens("p") == 12


def test_vllms_publisher_reaches_the_gateway_through_the_relay_signed() -> None:
    """vLLM's own publisher connects to the relay's loopback socket; a PULL socket stands in
    for the control plane. A new connection to it gets a full picture first."""
    port = free_port()
    gateway = zmq.Context.instance().socket(zmq.PULL)
    gateway.setsockopt(zmq.LINGER, 0)
    control_port = gateway.bind_to_random_port("tcp://127.0.0.1")
    thread = RelayThread(PrefixRelay("p", "inc"), port, f"tcp://127.0.0.1:{control_port}", SECRET)
    thread.start()
    config = json.loads(kv_events_config(port))
    publisher = ZmqEventPublisher(0, endpoint=config["endpoint"], topic=config["topic"])
    codec: Codec[Any] = Codec(ControlMessage, SECRET)
    try:
        received: list[PrefixEvents] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            publisher.publish(KVEventBatch(ts=time.time(), events=[block([1], None, TOKENS[:4])]))
            if gateway.poll(200):
                received.append(codec.decode(gateway.recv_multipart()))
            if any(e for b in received for e in b.events):
                break
        assert received and received[0].full and received[0].seq == 1
        assert index_of(received).match(TOKENS, BS, now=0.0).tokens("p") == 4
    finally:
        publisher.shutdown()
        thread.stop()
        gateway.close()


def test_the_instance_relays_only_in_a_cluster_and_unless_told_not_to() -> None:
    cluster = InstanceSettings(control_address="tcp://127.0.0.1:7000", prefix_events_port=5999)
    assert events_port_for(cluster) == 5999
    assert events_port_for(InstanceSettings()) is None
    off = InstanceSettings(control_address="tcp://127.0.0.1:7000", prefix_events=False)
    assert events_port_for(off) is None
    argv = vllm_argv(cluster, kv_settings_for(cluster), "m", None, [], False, 5999)
    config = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert config["endpoint"] == "tcp://127.0.0.1:5999" and config["topic"] == TOPIC
    with pytest.raises(SystemExit, match="--no-prefix-events"):
        vllm_argv(
            cluster, kv_settings_for(cluster), "m", None, ["--kv-events-config", "{}"], False, 1
        )
    mine = vllm_argv(off, kv_settings_for(off), "m", None, ["--kv-events-config", "{}"], False)
    assert mine.count("--kv-events-config") == 1
