"""Conversations in the simulator: the cached runs each turn's prompt is made of, and the
turns that follow one another.

vLLM caches every full block a request computes, prompt and output alike, under a hash of
its tokens and of everything before it, so turn k+1 of a conversation finds, in the cache of
an instance that served turn k, every full block of turn k's prompt and answer but its last
token (the last token sampled is never computed: it has no KV). The
simulator names those runs of blocks instead of hashing them (``pdserve.sim.blocks``): a
turn's chain is the tenant's system prompt (``("prefix", tenant)``, as the shared-prefix
workload names it), then, for every turn j up to its own, the blocks that became full with
turn j's user message (``("conv", c, j, "prompt")``) and with its answer (``("conv", c, j,
"answer")``). Prompt and answer are separate runs because a disaggregated request's
prefill instance computes only the prompt: it can serve turn j+1 the prompt's blocks, not
the answer's. A turn finds its own runs nowhere (they are computed by it) and caches them as
it computes them.

A turn arrives its think time after the previous turn ended; a turn that did not complete
ends its conversation, and the turns left are recorded as not sent, as the benchmark client
does.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.sim.blocks import Chain, PrefixKey
from pdserve.workload.workloads import BenchRequest


def conversation_chain(turns: Sequence[BenchRequest], block_size: int) -> Chain:
    """The chain of the last of ``turns``: its conversation's turns 0 .. k, in order, with
    their lengths as the simulator sends them (each answer exactly ``output_len`` tokens)."""
    last = turns[-1]
    runs: list[tuple[PrefixKey, int]] = []
    end = 0
    if last.prefix_group is not None and last.prefix_len >= block_size:
        end = last.prefix_len // block_size
        runs.append((("prefix", last.prefix_group), end))
    for turn in turns:
        prompt = turn.input_len // block_size
        answer = (turn.input_len + turn.output_len - 1) // block_size  # computed tokens
        for part, boundary in (("prompt", prompt), ("answer", answer)):
            if boundary > end:
                runs.append((("conv", last.conversation, turn.turn, part), boundary - end))
                end = boundary
    return tuple(runs)


def conversation_chains(requests: Sequence[BenchRequest], block_size: int) -> list[Chain]:
    """Every request's chain, conversation by conversation (the workload's order)."""
    chains: list[Chain] = []
    start = 0
    for index, request in enumerate(requests):
        if request.turn == 0:
            start = index
        chains.append(conversation_chain(requests[start : index + 1], block_size))
    return chains
