"""KV transfer throughput: pdserve's connector transport vs raw torch.distributed, same run.

Two processes hold KV caches shaped like the bundled model's (30 layers, 3 KV heads, head
size 64, float32; block size 32 tokens = 1.41 MiB per block over all layers). For each payload
size the importer pulls that many blocks from the exporter through the connector's transport
(KVWorker: ZeroMQ control, a gloo pair, one message per layer and run of consecutive blocks,
no copies), and the same processes send the same number of bytes as one raw ``send``/``recv``
on a gloo process group. Raw and connector transfers alternate; medians are reported.

    python -m benchmark.kv_transfer [--sizes-mib 1 4 16 64 256] [--repeats 7]

Prints GiB/s for both and the ratio connector/raw per size (target: >= 0.8), and for
fragmented blocks (every other block) both transfer modes: zero-copy and staged.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import time
import uuid
from datetime import timedelta
from typing import Any

LAYERS, HEADS, BLOCK_TOKENS, HEAD_DIM = 30, 3, 32, 64
SECRET = b"benchmark"


def block_bytes() -> int:
    return LAYERS * HEADS * BLOCK_TOKENS * 2 * HEAD_DIM * 4


def caches(num_blocks: int) -> dict[str, Any]:
    import torch

    buffer = torch.zeros(LAYERS, num_blocks, HEADS, BLOCK_TOKENS, 2 * HEAD_DIM)
    return {f"model.layers.{i}.self_attn.attn": buffer[i] for i in range(LAYERS)}


def raw_group(rank: int, port: int) -> Any:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=60))
    return dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=60))


def exporter(num_blocks: int, ports: dict[str, int], commands: Any, replies: Any) -> None:
    import torch

    from pdserve.kv.layout import build_layout
    from pdserve.kv.settings import KVSettings
    from pdserve.kv.worker_side import ExportOrder, KVWorker

    torch.set_num_threads(1)
    settings = KVSettings(instance_id="exporter", port=ports["kv"], transfer_timeout_s=60)
    worker = KVWorker(settings, build_layout(caches(num_blocks), num_blocks), 0, SECRET)
    group = raw_group(0, ports["raw"])
    replies.put("ready")
    try:
        while (command := commands.get()) is not None:
            kind, arg = command
            if kind == "export":
                transfer_id, blocks = arg
                worker.add_export(ExportOrder(transfer_id, transfer_id, blocks, lease_s=120))
                replies.put("ok")
            elif kind == "raw":
                group.send([torch.empty(arg, dtype=torch.uint8)], 1, 7).wait()
            elif kind == "drain":
                while worker.poll()[0]:
                    pass
    finally:
        worker.shutdown()


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from pdserve.cluster.processes import free_port
    from pdserve.kv.layout import build_layout
    from pdserve.kv.settings import KVSettings
    from pdserve.kv.worker_side import KVWorker, LoadOrder

    torch.set_num_threads(1)
    per_block = block_bytes()
    largest = max(math.ceil(s * 2**20 / per_block) for s in args.sizes_mib)
    num_blocks = 2 * largest + 2
    ports = {"kv": free_port(), "raw": free_port()}
    ctx = mp.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=exporter, args=(num_blocks, ports, commands, replies), daemon=True)
    proc.start()
    settings = KVSettings(instance_id="importer", port=free_port(), transfer_timeout_s=60)
    worker = KVWorker(settings, build_layout(caches(num_blocks), num_blocks), 0, SECRET)
    group = raw_group(1, ports["raw"])
    assert replies.get(timeout=120) == "ready"
    address = f"tcp://127.0.0.1:{ports['kv']}"

    def connector_once(blocks: int, fragmented: bool, staged: bool = False) -> float:
        """One pull, zero-copy or staged (--kv-staging always)."""
        worker.staging = "always" if staged else "never"
        return _pull(blocks, fragmented)

    def _pull(blocks: int, fragmented: bool) -> float:
        src = list(range(1, 1 + (2 * blocks if fragmented else blocks), 2 if fragmented else 1))
        dst = list(range(largest + 1, largest + 1 + blocks))
        transfer_id = uuid.uuid4().hex
        commands.put(("export", (transfer_id, src)))
        assert replies.get(timeout=60) == "ok"
        start = time.perf_counter()
        worker.start_load(LoadOrder(transfer_id, transfer_id, [address], 0, dst))
        while True:
            _, done, failed = worker.poll()
            if done:
                assert not failed, "transfer failed"
                return time.perf_counter() - start
            time.sleep(0.0002)

    def raw_once(nbytes: int) -> float:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        work = group.recv([buffer], 0, 7)
        start = time.perf_counter()
        commands.put(("raw", nbytes))
        work.wait()
        return time.perf_counter() - start

    connector_once(1, False)  # forms the pair; its cost is reported separately
    setup_ms = worker.take_stats().pair_setup_seconds * 1e3
    raw_once(1 << 20)
    rows = []
    for size_mib in args.sizes_mib:
        blocks = max(1, math.ceil(size_mib * 2**20 / per_block))
        nbytes = blocks * per_block
        raw, direct, scattered, scattered_direct = [], [], [], []
        for _ in range(args.repeats):
            raw.append(raw_once(nbytes))
            direct.append(connector_once(blocks, fragmented=False))
            scattered.append(connector_once(blocks, fragmented=True, staged=True))
            scattered_direct.append(connector_once(blocks, fragmented=True, staged=False))
        commands.put(("drain", None))
        gib = nbytes / 2**30
        row = {
            "payload_mib": round(nbytes / 2**20, 2),
            "blocks": blocks,
            "raw_gib_s": gib / statistics.median(raw),
            "connector_gib_s": gib / statistics.median(direct),
            "connector_fragmented_gib_s": gib / statistics.median(scattered),
            "connector_fragmented_direct_gib_s": gib / statistics.median(scattered_direct),
        }
        row["ratio"] = row["connector_gib_s"] / row["raw_gib_s"]
        row["ratio_fragmented"] = row["connector_fragmented_gib_s"] / row["raw_gib_s"]
        rows.append(row)
        print(
            f"{row['payload_mib']:8.1f} MiB {blocks:4d} blocks  raw {row['raw_gib_s']:5.2f} GiB/s  "
            f"connector {row['connector_gib_s']:5.2f} GiB/s (ratio {row['ratio']:.2f})  "
            f"fragmented: staged {row['connector_fragmented_gib_s']:5.2f} GiB/s, "
            f"direct {row['connector_fragmented_direct_gib_s']:5.2f} GiB/s",
            flush=True,
        )
    print(f"pair set-up (once per pair of workers): {setup_ms:.1f} ms")
    commands.put(None)
    proc.join(10)
    worker.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    print(
        f"KV layout: {LAYERS} layers x {HEADS} heads x {BLOCK_TOKENS} tokens x {HEAD_DIM} dims "
        f"x 2 (K, V) float32 = {block_bytes() / 2**20:.2f} MiB per block; gloo on loopback"
    )
    rows = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
