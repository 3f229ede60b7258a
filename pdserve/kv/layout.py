"""The shape of a worker's KV cache, seen as runs of whole blocks.

vLLM gives a connector one tensor per attention layer. On CPU (layout LBHNC) it is
``[num_blocks, kv_heads, block_size, 2 * head_size]``, one contiguous region per layer; GPU
backends may put K and V in two planes ``[2, num_blocks, ...]``. Either way a *plane* here is
a tensor whose first dimension indexes blocks, and every block of it must be one contiguous
region. Where consecutive blocks are also adjacent (the layer is one region), a run of
blocks is one contiguous slice, sent as one message without any copy; where they are not
(layouts with blocks outermost across layers, e.g. vLLM's ``BLHNC``, put the other layers'
blocks in between), each block of a run is its own message, still without a copy.

The *plane digest* (``KVLayout.plane_digest``) digests that ordered plane list: per plane the
layer name, the shape of one block and the dtype. Two workers pair only if their digests
agree (``PairOpen.plane_digest``), so that message i of a transfer lands in plane i on both
sides. It is not the scheduler side's *cache fingerprint* (``SourceSpec.cache_fingerprint``),
which digests vLLM's cache configuration (see ``pdserve.kv.messages``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from pdserve.kv.messages import Run


def _natural_key(name: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class KVLayout:
    """Planes of the cache in a fixed order both ends agree on, and their digest."""

    planes: tuple[torch.Tensor, ...]
    # Digest of the ordered planes (layer name, block shape, dtype each), see the docstring.
    plane_digest: str
    num_blocks: int

    @property
    def device(self) -> torch.device:
        return self.planes[0].device

    @property
    def bytes_per_block(self) -> int:
        return sum(p[0].numel() * p.element_size() for p in self.planes)

    def slices(self, runs: Sequence[Run], side: int) -> Iterator[torch.Tensor]:
        """Contiguous slices, plane-major, for the source (side=0) or destination (side=1).

        One per run, or one per block of a run in a plane whose blocks are not adjacent.
        """
        for plane in self.planes:
            adjacent = plane.is_contiguous()
            for run in runs:
                start, count = run[side], run[2]
                if adjacent:
                    yield plane[start : start + count]
                else:
                    for block in range(start, start + count):
                        yield plane[block : block + 1]

    def message_count(self, runs: Sequence[Run]) -> int:
        """How many messages ``slices`` makes of these runs (per side)."""
        blocks = sum(run[2] for run in runs)
        return sum(len(runs) if p.is_contiguous() else blocks for p in self.planes)

    # --- staged transfers: few large messages for small or scattered payloads --------------

    def prefer_staged(self, runs: Sequence[Run]) -> bool:
        """Direct transfers send one message per plane and run; this says whether those
        would be small (where a transport with a high per-message cost gains by gathering)."""
        blocks = sum(run[2] for run in runs)
        messages = self.message_count(runs)
        return blocks * self.bytes_per_block / max(1, messages) < STAGE_WHEN_MESSAGES_BELOW

    def stage_groups(self, num_blocks: int) -> list[range]:
        """Consecutive planes per staged message, each message at most STAGE_MESSAGE_BYTES."""
        groups: list[range] = []
        start, size = 0, 0
        for index, plane in enumerate(self.planes):
            plane_bytes = num_blocks * plane[0].nbytes
            if index > start and size + plane_bytes > STAGE_MESSAGE_BYTES:
                groups.append(range(start, index))
                start, size = index, 0
            size += plane_bytes
        groups.append(range(start, len(self.planes)))
        return groups

    def _rows(self, index: int) -> torch.Tensor:
        """Plane ``index`` as raw bytes, one row per block: a view, never a copy."""
        return _rows_of(self.planes[index])

    def gather(self, group: range, blocks: torch.Tensor) -> torch.Tensor:
        """Copies the given blocks of a group of planes into one new contiguous buffer."""
        buffer = self.staging_buffer(group, len(blocks))
        offset = 0
        for index in group:
            rows = self._rows(index)
            size = len(blocks) * rows.shape[1]
            torch.index_select(
                rows, 0, blocks, out=buffer[offset : offset + size].view(len(blocks), -1)
            )
            offset += size
        return buffer

    def staging_buffer(self, group: range, num_blocks: int) -> torch.Tensor:
        return torch.empty(
            sum(num_blocks * self.planes[i][0].nbytes for i in group),
            dtype=torch.uint8,
            device=self.device,
        )

    def scatter(self, group: range, blocks: torch.Tensor, buffer: torch.Tensor) -> None:
        """Copies a received buffer (see ``gather``) into the given blocks."""
        offset = 0
        for index in group:
            rows = self._rows(index)
            size = len(blocks) * rows.shape[1]
            rows.index_copy_(0, blocks, buffer[offset : offset + size].view(len(blocks), -1))
            offset += size


# A staged message carries at most this much. With staging "auto", direct messages smaller
# than the threshold on average make a transfer staged.
STAGE_MESSAGE_BYTES = 64 * 2**20
STAGE_WHEN_MESSAGES_BELOW = 512 * 2**10


def run_blocks(runs: Sequence[Run], side: int) -> list[int]:
    """The block ids a list of runs covers, on the source (0) or destination (1) side."""
    return [run[side] + i for run in runs for i in range(run[2])]


def _rows_of(plane: torch.Tensor) -> torch.Tensor:
    # ``view`` (not ``reshape``, which would silently copy a plane it cannot view: staged
    # receives would then scatter into the copy) works for any plane of contiguous blocks.
    return plane.view(plane.shape[0], -1).view(torch.uint8)


def _check_plane(name: str, plane: torch.Tensor, device: torch.device) -> None:
    """Everything the transfers rely on about a plane, for every block of it."""
    if plane.device != device:
        raise ValueError(f"layer {name} is on {plane.device}, the first layer on {device}")
    # Every block has the strides of block 0: one block contiguous means all of them are.
    if not plane[0].is_contiguous():
        raise ValueError(
            f"blocks of layer {name} are not contiguous in memory (plane shape "
            f"{tuple(plane.shape)}, strides {plane.stride()})"
        )
    try:
        _rows_of(plane)  # what staged transfers gather from and scatter into
    except RuntimeError as e:
        raise ValueError(f"layer {name}: its blocks cannot be viewed as rows of bytes") from e


def _planes_of(tensor: torch.Tensor, num_blocks: int) -> list[torch.Tensor]:
    if tensor.shape[0] == num_blocks:
        return [tensor]
    if tensor.dim() >= 2 and tensor.shape[0] == 2 and tensor.shape[1] == num_blocks:
        return [tensor[0], tensor[1]]
    raise ValueError(
        f"cannot find the block dimension ({num_blocks} blocks) in a KV tensor of shape "
        f"{tuple(tensor.shape)}"
    )


def build_layout(kv_caches: dict[str, torch.Tensor], num_blocks: int | None = None) -> KVLayout:
    """Orders the layers by name (numbers compared as numbers) and skips aliased tensors."""
    if not kv_caches:
        raise ValueError("no KV cache tensors were registered")
    names = sorted(kv_caches, key=_natural_key)
    blocks = num_blocks or kv_caches[names[0]].shape[0]
    planes: list[torch.Tensor] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    description = []
    for name in names:
        tensor = kv_caches[name]
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        for plane in _planes_of(tensor, blocks):
            _check_plane(name, plane, planes[0].device if planes else plane.device)
            planes.append(plane)
            entry: list[object] = [name, list(plane.shape[1:]), str(plane.dtype)]
            if not plane.is_contiguous():
                # One message per block, not per run: both ends must split runs alike.
                entry.append("blocks apart")
            description.append(entry)
    digest = hashlib.sha256(json.dumps(description).encode()).hexdigest()[:16]
    return KVLayout(planes=tuple(planes), plane_digest=digest, num_blocks=blocks)


def block_runs(src: Sequence[int], dst: Sequence[int]) -> list[Run]:
    """Pairs two equally long block lists into maximal runs consecutive on both sides."""
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} source blocks but {len(dst)} destination blocks")
    runs: list[Run] = []
    for s, d in zip(src, dst, strict=False):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs
