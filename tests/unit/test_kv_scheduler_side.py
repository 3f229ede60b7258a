"""The connector's scheduler side with fake vLLM requests: what it exports, loads and frees."""

from __future__ import annotations

import time

import pytest
from vllm.v1.request import RequestStatus

from pdserve.kv.exports import ExportRegistry, Refusal
from pdserve.kv.messages import (
    Ack,
    Failed,
    KVFailure,
    Pin,
    Pinned,
    PullRequest,
    Unpin,
    parse_params,
)
from pdserve.kv.metadata import (
    ExportOrder,
    LoadOrder,
    ReleaseOrder,
    StepOrders,
    loads_synchronously,
)
from pdserve.kv.scheduler_side import SchedulerSide, cache_fingerprint
from pdserve.kv.settings import KVSettings
from tests.unit.kv_fakes import (
    BLOCK_SIZE,
    FakeBlocks,
    FakeCacheManager,
    FakeControl,
    FakeRequest,
    FakeSchedulerOutput,
    decode_request,
    kv_cache_config,
    prefill_request,
    source_for,
    vllm_config,
)

TOKENS = list(range(100, 110))  # 10 tokens: blocks of 4, 4 and 2


def side(lease_s: float = 30.0, tp_size: int = 1, sync_up_to: int = 0) -> SchedulerSide:
    """``sync_up_to``: ``sync_load_max_tokens`` (0 here: every load of these small fake
    prompts would be synchronous by default)."""
    settings = KVSettings(
        instance_id="here", port=7100, lease_s=lease_s, sync_load_max_tokens=sync_up_to
    )
    scheduler = SchedulerSide(vllm_config(tp_size), kv_cache_config(), settings, b"secret")
    scheduler.bind(FakeCacheManager())  # type: ignore[arg-type]
    return scheduler


def orders(scheduler: SchedulerSide) -> StepOrders:
    return scheduler.build_orders(FakeSchedulerOutput())  # type: ignore[arg-type]


def finish(request: FakeRequest, status: RequestStatus = RequestStatus.FINISHED_LENGTH_CAPPED):
    request.status = status
    request.num_computed_tokens = request.num_tokens


def pull(transfer_id: str, count: int) -> PullRequest:
    return PullRequest(
        rid=1, transfer_id=transfer_id, pair_id="p", seq=0, first=0, dst=list(range(count))
    )


def drain(registry: ExportRegistry) -> list[str]:
    done = []
    while not registry.finished.empty():
        done.append(registry.finished.get_nowait())
    return done


# --- producer (prefill instance) -------------------------------------------------------------


def test_a_finished_prefill_is_exported_with_its_source() -> None:
    scheduler = side()
    request = prefill_request("req-p", TOKENS, "t1")
    finish(request)
    delay_free, params = scheduler.request_finished(request, [30, 31, 7, 99])  # type: ignore[arg-type]
    assert delay_free, "vLLM must keep the blocks for the pull"
    parsed = parse_params(params)
    assert parsed is not None and parsed.source is not None
    source = parsed.source
    assert source.transfer_id == "t1" and source.instance_id == "here"
    assert source.num_tokens == 10 and source.block_size == BLOCK_SIZE
    assert source.addresses == ["tcp://127.0.0.1:7100"]
    assert source.cache_fingerprint == scheduler.cache_fingerprint
    step = orders(scheduler)
    # Only the blocks holding the 10 computed tokens are exported.
    assert step.exports == [ExportOrder("t1", "req-p", [30, 31, 7], 30.0, num_computed_tokens=10)]
    assert not orders(scheduler), "orders are handed over once"


def test_exported_blocks_are_held_until_pulled() -> None:
    scheduler, registry = side(), ExportRegistry()
    request = prefill_request("req-p", TOKENS, "t1")
    finish(request)
    scheduler.request_finished(request, [30, 31, 7])  # type: ignore[arg-type]
    for export in orders(scheduler).exports:
        registry.add(export)
    registry.expire()
    assert drain(registry) == [], "held while nobody pulled"
    claimed = registry.begin_pull(pull("t1", 3))
    assert not isinstance(claimed, Refusal) and claimed[1] == [30, 31, 7]
    registry.end_pull(claimed[0])
    assert drain(registry) == ["req-p"], "freed once pulled"
    late = registry.begin_pull(pull("t1", 3))
    assert isinstance(late, Refusal) and late.failure is KVFailure.ALREADY_PULLED


def test_exported_blocks_are_freed_when_the_lease_expires() -> None:
    scheduler, registry = side(lease_s=0.01), ExportRegistry()
    request = prefill_request("req-p", TOKENS, "t1")
    finish(request)
    scheduler.request_finished(request, [30, 31, 7])  # type: ignore[arg-type]
    for export in orders(scheduler).exports:
        registry.add(export)
    time.sleep(0.02)
    registry.expire()
    assert drain(registry) == ["req-p"] and registry.expired_count == 1
    late = registry.begin_pull(pull("t1", 3))
    assert isinstance(late, Refusal) and late.failure is KVFailure.LEASE_EXPIRED


@pytest.mark.parametrize("status", [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR])
def test_an_aborted_prefill_frees_its_blocks_at_once(status: RequestStatus) -> None:
    scheduler = side()
    request = prefill_request("req-p", TOKENS, "t1")
    finish(request, status)
    assert scheduler.request_finished(request, [30, 31, 7]) == (False, None)  # type: ignore[arg-type]
    assert not orders(scheduler)


def test_a_request_without_export_is_not_kept() -> None:
    scheduler = side()
    request = FakeRequest("plain", TOKENS)
    finish(request)
    assert scheduler.request_finished(request, [1, 2, 3]) == (False, None)  # type: ignore[arg-type]
    assert not orders(scheduler)


# --- consumer (decode instance) --------------------------------------------------------------


def test_a_decode_request_loads_its_prompt_asynchronously() -> None:
    scheduler = side()
    request = decode_request("req-d", TOKENS, source_for(TOKENS, scheduler.cache_fingerprint))
    assert scheduler.get_num_new_matched_tokens(request, 0) == (10, True)  # type: ignore[arg-type]
    scheduler.update_state_after_alloc(request, FakeBlocks([5, 6, 9]), 10)  # type: ignore[arg-type]
    (load,) = orders(scheduler).loads
    # The last token is recomputed here: blocks up to the one holding token 9 (of 0..9).
    assert load == LoadOrder(
        "req-d", "t1", ["tcp://10.0.0.1:7100"], 0, [5, 6, 9], last=True, needs_tokens=9
    )


def test_a_local_prefix_hit_loads_only_the_rest() -> None:
    scheduler = side()
    source = source_for(TOKENS, scheduler.cache_fingerprint, keep=True)
    request = decode_request("req-d", TOKENS, source)
    assert scheduler.get_num_new_matched_tokens(request, 4) == (6, True)  # type: ignore[arg-type]
    scheduler.update_state_after_alloc(request, FakeBlocks([5, 6, 9]), 6)  # type: ignore[arg-type]
    (load,) = orders(scheduler).loads
    assert (load.first, load.dst, load.last) == (1, [6, 9], False)


def test_a_small_tail_loads_synchronously_and_leaves_only_the_last_token() -> None:
    """A migration's tail: loaded before this step's forward, which computes the last
    token, so the moved request produces a token one step after its admission."""
    scheduler = side(sync_up_to=8)
    source = source_for(TOKENS, scheduler.cache_fingerprint)
    request = decode_request("req-d", TOKENS, source)
    assert scheduler.get_num_new_matched_tokens(request, 4) == (5, False)  # type: ignore[arg-type]
    scheduler.update_state_after_alloc(request, FakeBlocks([5, 6, 9]), 5)  # type: ignore[arg-type]
    (load,) = orders(scheduler).loads
    assert (load.first, load.dst, load.sync) == (1, [6, 9], True)
    longer = decode_request("req-e", TOKENS, source_for(TOKENS, scheduler.cache_fingerprint))
    assert scheduler.get_num_new_matched_tokens(longer, 0) == (10, True), "9 > 8: async"  # type: ignore[arg-type]
    scheduler.update_state_after_alloc(longer, FakeBlocks([1, 2, 3]), 10)  # type: ignore[arg-type]
    assert not orders(scheduler).loads[0].sync


def test_a_tail_within_one_block_past_a_local_hit_loads_synchronously() -> None:
    """A migration's tail after its pre-copy is up to one partial block (127 tokens with
    vLLM's 128-token CPU blocks): synchronous beyond the token limit, so no cut waits for
    an asynchronous load's extra steps; without a local hit the token limit alone counts."""
    scheduler = side(sync_up_to=1)
    prompt = TOKENS[:8]  # blocks of 4: a local hit of 4, a tail of 3 more
    cut = decode_request("req-d", prompt, source_for(prompt, scheduler.cache_fingerprint))
    assert scheduler.get_num_new_matched_tokens(cut, 4) == (3, False)  # type: ignore[arg-type]
    fresh = decode_request("req-e", prompt, source_for(prompt, scheduler.cache_fingerprint))
    assert scheduler.get_num_new_matched_tokens(fresh, 0) == (8, True)  # type: ignore[arg-type]
    longer = decode_request("req-f", TOKENS, source_for(TOKENS, scheduler.cache_fingerprint))
    assert scheduler.get_num_new_matched_tokens(longer, 4) == (6, True), "5 > one block"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("missing", "hit", "limit", "sync"),
    [(1, 128, 64, False), (65, 0, 64, True), (66, 0, 64, False), (128, 128, 64, True),
     (130, 128, 64, False), (100, 128, 0, False), (100, 0, 200, True)],
)  # fmt: skip
def test_loads_synchronously(missing: int, hit: int, limit: int, sync: bool) -> None:
    assert loads_synchronously(missing, hit, 128, limit) is sync


def test_an_allocation_without_external_tokens_orders_nothing() -> None:
    scheduler = side()
    request = decode_request("req-d", TOKENS, source_for(TOKENS, scheduler.cache_fingerprint))
    scheduler.update_state_after_alloc(request, FakeBlocks([5, 6, 9]), 0)  # type: ignore[arg-type]
    assert not orders(scheduler)


def test_a_request_without_source_loads_nothing() -> None:
    scheduler = side()
    assert scheduler.get_num_new_matched_tokens(FakeRequest("x", TOKENS), 0) == (0, False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "failure"),
    [
        ({"block_size": 8}, KVFailure.BLOCK_SIZE_MISMATCH),
        ({"cache_fingerprint": "other"}, KVFailure.CACHE_MISMATCH),
        ({"addresses": ["tcp://a:1", "tcp://a:2"]}, KVFailure.TP_MISMATCH),
        ({"tokens": [*TOKENS[:-1], 0]}, KVFailure.TOKENS_MISMATCH),
        ({"tokens": TOKENS[:5]}, KVFailure.TOKENS_MISMATCH),
    ],
)
def test_an_untrusted_source_is_released_and_prefilled_locally(
    change: dict, failure: KVFailure
) -> None:
    scheduler = side()
    tokens = change.pop("tokens", TOKENS)
    options = {"cache_fingerprint": scheduler.cache_fingerprint, **change}
    source = source_for(tokens, **options)
    request = decode_request("req-d", TOKENS, source)
    untrusted = scheduler._untrusted_reason(request, source)  # type: ignore[arg-type]
    assert untrusted is not None and untrusted[0] is failure
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)  # type: ignore[arg-type]
    step = orders(scheduler)
    assert step.releases == [ReleaseOrder("t1", source.addresses)] and not step.loads
    # Asked again (e.g. the next step), the decision stands and nothing is released twice.
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)  # type: ignore[arg-type]
    assert not orders(scheduler)


def test_a_request_that_loaded_is_prefilled_locally_if_asked_again() -> None:
    """Under the "recompute" policy a failed load brings the request back: no second load."""
    scheduler = side()
    request = decode_request("req-d", TOKENS, source_for(TOKENS, scheduler.cache_fingerprint))
    scheduler.get_num_new_matched_tokens(request, 0)  # type: ignore[arg-type]
    scheduler.update_state_after_alloc(request, FakeBlocks([5, 6, 9]), 10)  # type: ignore[arg-type]
    orders(scheduler)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)  # type: ignore[arg-type]


def test_the_cache_fingerprint_covers_geometry_and_tp() -> None:
    base = cache_fingerprint(kv_cache_config(), 1)  # type: ignore[arg-type]
    assert base == cache_fingerprint(kv_cache_config(), 1)  # type: ignore[arg-type]
    assert base != cache_fingerprint(kv_cache_config(), 2)  # type: ignore[arg-type]
    assert base != cache_fingerprint(kv_cache_config(head_size=16), 1)  # type: ignore[arg-type]
    assert base != cache_fingerprint(kv_cache_config(block_size=8), 1)  # type: ignore[arg-type]


# --- migration: engine control commands ------------------------------------------------------


def control(scheduler: SchedulerSide, *messages: object) -> list[object]:
    fake = FakeControl()
    scheduler._control = fake  # type: ignore[assignment]
    for message in messages:
        scheduler._receive_control(b"gateway", message)
    orders(scheduler)  # commands are answered on the engine thread, once per step
    return [reply for _, reply in fake.replies]


def running(scheduler: SchedulerSide, key: str, blocks: list[int]) -> FakeRequest:
    request = decode_request("req-r", TOKENS, source_for(TOKENS, "x"), request_key=key)
    request.status = RequestStatus.RUNNING
    request.num_computed_tokens = 10
    scheduler.on_new_request(request)  # type: ignore[arg-type]
    assert scheduler._kv_cache_manager is not None
    scheduler._kv_cache_manager.blocks["req-r"] = blocks  # type: ignore[attr-defined]
    return request


def test_pin_exports_a_running_request_live() -> None:
    scheduler = side()
    running(scheduler, "key-1", [3, 4, 5])
    fake = FakeControl()
    scheduler._control = fake  # type: ignore[assignment]
    scheduler._receive_control(b"gw", Pin(rid=7, request_key="key-1", transfer_id="mig"))
    step = orders(scheduler)
    (reply,) = [r for _, r in fake.replies]
    assert isinstance(reply, Pinned) and reply.rid == 7
    assert reply.cache_fingerprint == scheduler.cache_fingerprint
    assert step.exports == [
        ExportOrder("mig", "req-r", [3, 4, 5], 30.0, owns=False, num_computed_tokens=10)
    ]


@pytest.mark.parametrize(
    ("status", "failure"),
    [
        (RequestStatus.WAITING, KVFailure.REQUEST_WAITING),
        (RequestStatus.WAITING_FOR_REMOTE_KVS, KVFailure.REQUEST_WAITING),
        (RequestStatus.PREEMPTED, KVFailure.NOT_RUNNING),
    ],
)
def test_pin_of_a_request_that_does_not_run_is_refused_with_its_code(
    status: RequestStatus, failure: KVFailure
) -> None:
    scheduler = side()
    running(scheduler, "key-1", [3]).status = status
    (reply,) = control(scheduler, Pin(rid=1, request_key="key-1", transfer_id="mig"))
    assert isinstance(reply, Failed) and reply.code is failure


def test_control_refusals_carry_codes() -> None:
    scheduler = side()
    running(scheduler, "key-1", [3])
    replies = control(
        scheduler,
        Pin(rid=1, request_key="nobody", transfer_id="a"),
        Pin(rid=2, request_key="key-1", transfer_id="b"),
        Pin(rid=3, request_key="key-1", transfer_id="c"),
        Unpin(rid=4, transfer_id="b"),
        Unpin(rid=5, transfer_id="b"),
        Ack(rid=6),
    )
    assert isinstance(replies[1], Pinned) and isinstance(replies[3], Ack)
    codes = [(r.rid, r.code) for r in replies if isinstance(r, Failed)]
    assert codes == [
        (1, KVFailure.UNKNOWN_REQUEST),
        (3, KVFailure.ALREADY_PINNED),
        (5, KVFailure.NOT_PINNED),
        (6, KVFailure.UNEXPECTED_MESSAGE),
    ]


def test_a_pinned_request_that_ends_hands_its_blocks_to_the_export() -> None:
    scheduler = side()
    request = running(scheduler, "key-1", [3, 4])
    control(scheduler, Pin(rid=1, request_key="key-1", transfer_id="mig"))
    request.status = RequestStatus.FINISHED_ABORTED  # the gateway cut the stream
    assert scheduler.request_finished(request, [3, 4, 8]) == (True, None)  # type: ignore[arg-type]
    (update,) = orders(scheduler).updates
    assert update.transfer_id == "mig" and update.owns and update.block_ids == [3, 4, 8]


def test_a_preempted_pinned_request_voids_its_export() -> None:
    scheduler = side()
    running(scheduler, "key-1", [3, 4])
    control(scheduler, Pin(rid=1, request_key="key-1", transfer_id="mig"))
    step = scheduler.build_orders(FakeSchedulerOutput({"req-r"}))  # type: ignore[arg-type]
    (update,) = step.updates
    assert update.void and update.transfer_id == "mig"


def test_a_pinned_request_that_grows_updates_its_export() -> None:
    scheduler = side()
    running(scheduler, "key-1", [3, 4])
    control(scheduler, Pin(rid=1, request_key="key-1", transfer_id="mig"))
    scheduler._kv_cache_manager.blocks["req-r"] = [3, 4, 11]  # type: ignore[union-attr]
    (update,) = orders(scheduler).updates
    assert update.block_ids == [3, 4, 11] and not update.owns and not update.void
    assert not orders(scheduler).updates, "no news, no update"
