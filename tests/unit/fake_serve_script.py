"""A stand-in for ``pdserve serve`` in the benchmarks' unit tests (run as a script).

It parses the flags a benchmark gives ``pdserve serve``, records them with the cluster secret
it was given in ``LOG_DIR/fake-serve.json``, and serves a fake gateway on ``--port`` whose
``/admin/instances`` lists one fake ``both`` instance; that instance, like a real one in a
cluster, only accepts the key derived from the secret. SIGTERM stops it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ["FAKE_SERVE_REPO"])

from pdserve.protocol.wire import instance_api_key
from tests.unit.fake_endpoints import TOTAL_BLOCKS, FakeEndpoint, serving


def main(args: list[str]) -> None:
    assert args[0] == "serve", args
    port = int(args[args.index("--port") + 1])
    log_dir = Path(args[args.index("--log-dir") + 1])
    secret = os.environ["PDSERVE_CLUSTER_SECRET"]
    record = {"argv": args, "secret": secret, "pid": os.getpid()}
    (log_dir / "fake-serve.json").write_text(json.dumps(record))
    instance = FakeEndpoint(api_key=instance_api_key(secret.encode()))

    def rows(gateway: FakeEndpoint) -> list[dict[str, Any]]:
        used = instance.used_blocks()
        return [
            {
                "id": "both-0",
                "role": "both",
                "url": instance.url,
                "healthy": True,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "model": "fake-model",
                "free_blocks": TOTAL_BLOCKS - used,
                "total_blocks": TOTAL_BLOCKS,
                "num_running": instance.running,
                "num_waiting": 0,
            }
        ]

    delay = float(os.environ.get("FAKE_GATEWAY_DELAY_S", "0"))
    key = args[args.index("--api-key") + 1] if "--api-key" in args else None
    gateway = FakeEndpoint(api_key=key, first_token_delay_s=delay, admin_rows=rows)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    with serving(instance, gateway, ports=(0, port)):
        stop.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
