"""Blocks as runs, and the order and plane digest both ends of a transfer agree on."""

from __future__ import annotations

import pytest
import torch

from pdserve.kv.layout import block_runs, build_layout
from pdserve.kv.messages import tokens_digest


def test_runs_merge_blocks_consecutive_on_both_sides() -> None:
    assert block_runs([4, 5, 6, 9, 10], [1, 2, 3, 4, 5]) == [(4, 1, 3), (9, 4, 2)]
    assert block_runs([1, 2, 3], [7, 9, 10]) == [(1, 7, 1), (2, 9, 2)]
    assert block_runs([], []) == []


def test_runs_need_equal_lengths() -> None:
    with pytest.raises(ValueError):
        block_runs([1, 2], [1])


def test_layout_orders_layers_numerically_and_skips_aliases() -> None:
    base = torch.zeros(12, 11, 2, 4, 8)  # one buffer, eleven layers. views
    caches = {f"model.layers.{i}.attn": base[:, i] for i in (10, 2, 0)}
    caches["model.layers.2.alias"] = caches["model.layers.2.attn"]
    layout = build_layout(caches, num_blocks=12)
    assert len(layout.planes) == 3
    assert layout.planes[0].data_ptr() == caches["model.layers.0.attn"].data_ptr()
    assert layout.planes[2].data_ptr() == caches["model.layers.10.attn"].data_ptr()


def test_layout_of_two_plane_caches() -> None:
    caches = {"l0": torch.zeros(2, 6, 16, 2, 8), "l1": torch.zeros(2, 6, 16, 2, 8)}
    layout = build_layout(caches, num_blocks=6)
    assert len(layout.planes) == 4
    assert layout.bytes_per_block == 4 * 16 * 2 * 8 * 4


def test_slices_are_contiguous_views_into_the_cache() -> None:
    cache = torch.arange(6 * 2 * 4, dtype=torch.float32).reshape(6, 2, 4)
    layout = build_layout({"l0": cache}, num_blocks=6)
    (first, second) = list(layout.slices([(1, 0, 2), (4, 2, 1)], side=0))
    assert first.is_contiguous() and first.data_ptr() == cache[1].data_ptr()
    assert torch.equal(second, cache[4:5])
    (dest,) = list(layout.slices([(1, 3, 2)], side=1))
    assert dest.data_ptr() == cache[3].data_ptr()


def test_plane_digest_changes_with_shape_or_dtype() -> None:
    a = build_layout({"l0": torch.zeros(4, 2, 8)}, 4).plane_digest
    assert a == build_layout({"l0": torch.ones(4, 2, 8)}, 4).plane_digest
    assert a != build_layout({"l0": torch.zeros(4, 2, 16)}, 4).plane_digest
    assert a != build_layout({"l0": torch.zeros(4, 2, 8, dtype=torch.float16)}, 4).plane_digest


def test_missing_block_dimension_is_an_error() -> None:
    with pytest.raises(ValueError, match="block dimension"):
        build_layout({"l0": torch.zeros(3, 4)}, num_blocks=5)


def test_tokens_digest_is_order_sensitive() -> None:
    assert tokens_digest([1, 2, 3]) == tokens_digest([1, 2, 3])
    assert tokens_digest([1, 2, 3]) != tokens_digest([3, 2, 1])


def test_staged_gather_and_scatter_round_trip() -> None:
    from pdserve.kv.layout import run_blocks

    src = {f"l{i}": torch.randn(10, 2, 4, 8) for i in range(3)}
    dst = {f"l{i}": torch.zeros(10, 2, 4, 8) for i in range(3)}
    source, target = build_layout(src, 10), build_layout(dst, 10)
    runs = [(1, 7, 2), (5, 0, 1)]
    assert source.prefer_staged(runs), "tiny messages are staged"
    blocks_in = torch.tensor(run_blocks(runs, 0))
    blocks_out = torch.tensor(run_blocks(runs, 1))
    for group in source.stage_groups(3):
        target.scatter(group, blocks_out, source.gather(group, blocks_in))
    for name in src:
        assert torch.equal(dst[name][7:9], src[name][1:3])
        assert torch.equal(dst[name][0], src[name][5])
        assert torch.all(dst[name][3] == 0)


def test_stage_groups_cap_message_size(monkeypatch) -> None:
    import pdserve.kv.layout as layout_module

    # A block of a plane is 64 float32 = 256 bytes; messages may carry 512 bytes.
    monkeypatch.setattr(layout_module, "STAGE_MESSAGE_BYTES", 512)
    layout = build_layout({f"l{i}": torch.zeros(4, 64) for i in range(5)}, 4)
    assert [list(g) for g in layout.stage_groups(2)] == [[0], [1], [2], [3], [4]]
    assert [list(g) for g in layout.stage_groups(1)] == [[0, 1], [2, 3], [4]]
    # A plane larger than the cap still travels, alone.
    assert [list(g) for g in layout.stage_groups(3)] == [[0], [1], [2], [3], [4]]
