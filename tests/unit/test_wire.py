"""The authenticated envelope: what is accepted, and everything that is refused."""

from __future__ import annotations

import time

import msgspec
import pytest

from pdserve.kv.messages import KVMessage, PullRequest, Release
from pdserve.protocol import wire
from pdserve.protocol.net import is_loopback


@pytest.fixture
def codec() -> wire.Codec:
    return wire.Codec(KVMessage, b"s3cret")


def test_round_trip(codec: wire.Codec) -> None:
    message = PullRequest(rid=3, transfer_id="t", pair_id="p", seq=1, first=2, dst=[7, 8])
    assert codec.decode(codec.encode(message)) == message


def test_wrong_secret_is_refused(codec: wire.Codec) -> None:
    other = wire.Codec(KVMessage, b"other")
    with pytest.raises(wire.AuthError, match="MAC"):
        codec.decode(other.encode(Release(transfer_id="t")))


def test_tampered_body_is_refused(codec: wire.Codec) -> None:
    mac, body = codec.encode(Release(transfer_id="abc"))
    with pytest.raises(wire.AuthError):
        codec.decode([mac, body.replace(b"abc", b"abd")])


def test_stale_message_is_refused(codec: wire.Codec, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = codec.encode(Release(transfer_id="t"))
    monkeypatch.setattr(time, "time", lambda: 1e12)
    with pytest.raises(wire.AuthError, match="stale"):
        codec.decode(frames)


@pytest.mark.parametrize("frames", [[], [b"x"], [b"a", b"b", b"c"]])
def test_malformed_frames_are_refused(codec: wire.Codec, frames: list[bytes]) -> None:
    with pytest.raises(wire.AuthError):
        codec.decode(frames)


def test_authentic_but_unknown_type_is_refused(codec: wire.Codec) -> None:
    body = msgspec.msgpack.encode({"sent_at": time.time(), "message": {"type": "Evil"}})
    with pytest.raises(wire.AuthError, match="undecodable"):
        codec.decode([codec._mac(body), body])


def test_empty_secret_is_rejected() -> None:
    with pytest.raises(ValueError):
        wire.Codec(KVMessage, b"")


def test_secret_is_required_off_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    assert wire.cluster_secret(loopback_only=True)
    with pytest.raises(RuntimeError, match=wire.SECRET_ENV):
        wire.cluster_secret(loopback_only=False)
    monkeypatch.setenv(wire.SECRET_ENV, "abc")
    assert wire.cluster_secret(loopback_only=False) == b"abc"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
