"""Registers a running instance with the global scheduler, and deregisters it at exit.

The agent waits until the instance's HTTP server answers, reads the served model and its
context length from ``/v1/models``, then repeats ``Register`` every ``REGISTER_EVERY_S``
seconds: a scheduler that restarted learns the instance again within that time.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from typing import Any

import zmq

from pdserve.instance.settings import InstanceSettings
from pdserve.kv.settings import KVSettings
from pdserve.logs import get_logger
from pdserve.protocol.net import is_loopback
from pdserve.protocol.reports import ControlMessage, Deregister, Register
from pdserve.protocol.wire import Codec, cluster_secret, instance_api_key

logger = get_logger(__name__)

REGISTER_EVERY_S = 2.0


def local_url(settings: InstanceSettings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def tokenizer_of(args: Any) -> tuple[str, bool]:
    """What the gateway needs to count this instance's prompt tokens, from vLLM's parsed
    arguments: where its tokenizer loads from ("" where the gateway cannot load the same
    one: another tokenizer mode, remote code, a revision, no tokenizer), and whether chat
    is rendered with the tokenizer's own template and vLLM's defaults."""
    if (
        getattr(args, "tokenizer_mode", "auto") not in ("auto", "hf")
        or getattr(args, "trust_remote_code", False)
        or getattr(args, "revision", None)
        or getattr(args, "tokenizer_revision", None)
        or getattr(args, "skip_tokenizer_init", False)
    ):
        return "", False
    source = getattr(args, "tokenizer", None) or getattr(args, "model", None) or ""
    chat_default = (
        getattr(args, "chat_template", None) is None
        and getattr(args, "chat_template_content_format", "auto") == "auto"
        and not getattr(args, "default_chat_template_kwargs", None)
    )
    if source and os.path.exists(source):
        source = os.path.abspath(source)  # the gateway may run from another directory
    return str(source), chat_default


class RegistrationAgent:
    def __init__(
        self,
        settings: InstanceSettings,
        kv: KVSettings,
        pid: int,
        tp_size: int,
        tokenizer: tuple[str, bool] = ("", False),
    ) -> None:
        """``tokenizer``: ``tokenizer_of`` the instance's vLLM arguments."""
        assert settings.control_address is not None
        self.settings = settings
        self.tokenizer = tokenizer
        self.kv = kv
        self.pid = pid
        self.tp_size = tp_size
        self._secret = cluster_secret(loopback_only=is_loopback(settings.host))
        self._codec: Codec[Any] = Codec(ControlMessage, self._secret)
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 500)
        self._socket.setsockopt(zmq.SNDHWM, 16)
        self._socket.connect(settings.control_address)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-registration", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def _models(self) -> dict[str, Any] | None:
        request = urllib.request.Request(
            local_url(self.settings) + "/v1/models",
            headers={"Authorization": f"Bearer {instance_api_key(self._secret)}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return json.load(response)
        except OSError:
            return None

    def _registration(self) -> Register | None:
        models = self._models()
        if not models or not models.get("data"):
            return None
        card = models["data"][0]
        return Register(
            instance_id=self.kv.instance_id,
            role=self.settings.role,
            url=self.settings.url(),
            host=socket.gethostname(),
            pid=self.pid,
            model=card["id"],
            kv_addresses=[self.kv.address_of_rank(r) for r in range(self.tp_size)],
            control_address=(
                f"tcp://{self.kv.advertise_host or self.kv.host}:{self.kv.control_port}"
                if self.kv.control_port
                else None
            ),
            max_model_len=int(card.get("max_model_len") or 0),
            started_at=time.time(),
            incarnation=self.kv.incarnation,
            tokenizer=self.tokenizer[0],
            chat_template_default=self.tokenizer[1],
        )

    def _send(self, message: Any) -> None:
        with self._lock:
            try:
                self._socket.send_multipart(self._codec.encode(message), flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:
                logger.warning("pdserve: could not reach the scheduler: %s", e)

    def _run(self) -> None:
        registration = None
        while registration is None and not self._stopped.wait(0.5):
            registration = self._registration()
        if registration is None:
            return
        logger.info(
            "pdserve: registering %s with %s",
            registration.instance_id,
            self.settings.control_address,
        )
        while not self._stopped.is_set():
            self._send(registration)
            self._stopped.wait(REGISTER_EVERY_S)

    def stop(self) -> None:
        self._stopped.set()
        self._send(Deregister(instance_id=self.kv.instance_id))
        self._socket.close(linger=500)
