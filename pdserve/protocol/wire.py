"""Authenticated control messages: msgspec structs in an HMAC envelope over ZeroMQ.

Every control-plane and KV-control message in pdserve is a ``msgspec.Struct`` with a ``tag``,
encoded as msgpack and sent as two ZeroMQ frames ``[mac, body]`` where
``mac = HMAC-SHA256(cluster secret, body)``. Nothing received is unpickled or evaluated: a
frame that fails the MAC, is stale, or does not decode into one of the expected structs is
dropped and logged. The body carries the sender's clock, so a captured message cannot be
replayed after ``MAX_AGE_S``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec

logger = logging.getLogger(__name__)

SECRET_ENV = "PDSERVE_CLUSTER_SECRET"
MAX_AGE_S = 120.0
_DEV_SECRET = "pdserve-loopback-only-insecure-default"

T = TypeVar("T")


class Envelope(msgspec.Struct, Generic[T], frozen=True):
    """What the MAC covers: the message and the sender's wall clock."""

    sent_at: float
    message: T


class AuthError(Exception):
    """A frame that is not from a holder of the cluster secret (or is stale, or malformed)."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def cluster_secret(loopback_only: bool) -> bytes:
    """The secret from ``$PDSERVE_CLUSTER_SECRET``.

    Without one, a cluster bound to loopback addresses only gets a fixed development secret
    (other users of the same machine could still talk to it, which the docs say); a cluster
    reachable from the network refuses to start.
    """
    value = os.environ.get(SECRET_ENV)
    if value:
        return value.encode()
    if not loopback_only:
        raise RuntimeError(
            f"set {SECRET_ENV} to the same random string on every host of the cluster "
            "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return _DEV_SECRET.encode()


class Codec(Generic[T]):
    """Encodes and authenticates one union of message types."""

    def __init__(self, message_type: Any, secret: bytes) -> None:
        if not secret:
            raise ValueError("an empty cluster secret authenticates nothing")
        self._secret = secret
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Envelope[message_type])  # type: ignore[valid-type]

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()

    def encode(self, message: T) -> list[bytes]:
        body = self._encoder.encode(Envelope(sent_at=time.time(), message=message))
        return [self._mac(body), body]

    def decode(self, frames: Sequence[bytes]) -> T:
        if len(frames) != 2:
            raise AuthError(f"expected 2 frames, got {len(frames)}")
        mac, body = bytes(frames[0]), bytes(frames[1])
        if not hmac.compare_digest(mac, self._mac(body)):
            raise AuthError("bad MAC: sender does not hold the cluster secret")
        try:
            envelope = self._decoder.decode(body)
        except msgspec.DecodeError as e:
            raise AuthError(f"undecodable message: {e}") from e
        if abs(time.time() - envelope.sent_at) > MAX_AGE_S:
            raise AuthError("stale message (clock skew or replay)")
        return envelope.message


def derived_key(secret: bytes, purpose: str) -> str:
    """A per-purpose token derived from the cluster secret (e.g. instances' HTTP API key)."""
    return hmac.new(secret, purpose.encode(), hashlib.sha256).hexdigest()


def instance_api_key(secret: bytes) -> str:
    """The key instances in a cluster require on /v1; only the gateway derives it."""
    return derived_key(secret, "instance-http")
