"""One behaviour contract for every JobStore backend: each test runs against SQLite and a real Redis."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from wanserve import expiry
from wanserve.errors import InvalidRequest, JobNotFound, QueueFull
from wanserve.jobs import Job, JobStatus, JobStore, new_job_id, open_store
from wanserve.jobs.redis_store import RedisJobStore
from wanserve.jobs.sqlite import SQLiteJobStore
from wanserve.storage.local import LocalStorage

from conftest import free_tcp_port

LEASE = 30.0
TTL = 3600.0
T0 = 1_000_000.0  # a fixed clock for the methods that take `now`


def make_job(model: str = "tiny-t2v", priority: int = 0, **fields: Any) -> Job:
    # Empty list and nested floats: shapes a naive JSON round trip (e.g. Lua's cjson) would corrupt.
    request = {"prompt": "a red fox", "negative_prompt": "", "loras": [], "guidance": {"scale": 5.25}}
    return Job(id=new_job_id(), model=model, request=request, priority=priority, **fields)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        backend: JobStore = SQLiteJobStore(tmp_path / "db" / "jobs.db")
    else:
        backend = RedisJobStore(request.getfixturevalue("redis_url"))
    yield backend
    backend.close()


def enqueue_many(store: JobStore, count: int, model: str = "tiny-t2v", priority: int = 0) -> list[Job]:
    return [store.enqueue(make_job(model, priority)) for _ in range(count)]


def claim(store: JobStore, worker: str = "w1", model: str = "tiny-t2v", now: float = T0) -> Job:
    job = store.claim(model, worker, LEASE, now=now)
    assert job is not None
    return job


# ---- enqueue / get ------------------------------------------------------------------------------------------


def test_store_satisfies_the_protocol(store: JobStore) -> None:
    assert isinstance(store, JobStore)
    assert store.ping()


def test_enqueue_then_get_round_trips_every_field(store: JobStore) -> None:
    job = make_job(priority=3, source="video")
    stored = store.enqueue(job)
    assert stored.to_dict() == job.to_dict()
    assert store.get(job.id).to_dict() == job.to_dict()
    assert store.get(job.id).status is JobStatus.QUEUED


def test_get_unknown_id_raises_job_not_found(store: JobStore) -> None:
    with pytest.raises(JobNotFound) as info:
        store.get("video_missing")
    assert info.value.job_id == "video_missing"


def test_enqueue_refuses_a_duplicate_id_and_a_non_queued_job(store: JobStore) -> None:
    job = store.enqueue(make_job())
    with pytest.raises(ValueError, match="already exists"):
        store.enqueue(replace(make_job(), id=job.id))
    with pytest.raises(ValueError, match="queued"):
        store.enqueue(make_job(status=JobStatus.COMPLETED))
    assert store.queue_depth("tiny-t2v") == 1


def test_enqueue_raises_queue_full_at_max_queued_per_model(store: JobStore) -> None:
    first, _ = store.enqueue(make_job(), max_queued=2), store.enqueue(make_job(), max_queued=2)
    with pytest.raises(QueueFull) as info:
        store.enqueue(make_job(), max_queued=2)
    assert info.value.model == "tiny-t2v" and info.value.limit == 2 and info.value.retry_after > 0
    store.enqueue(make_job("tiny-i2v"), max_queued=2)  # another model's queue is separate
    assert store.queue_depth("tiny-t2v") == 2
    assert claim(store).id == first.id  # a running job no longer waits: there is room again
    store.enqueue(make_job(), max_queued=2)


def test_an_idempotency_key_returns_the_job_it_created_instead_of_a_second(store: JobStore) -> None:
    first = store.enqueue(make_job(idempotency_key="order-17", fingerprint="f1"), max_queued=1)
    # The retry of a create whose answer was lost: the same key finds the first job, even with the queue full.
    again = store.enqueue(make_job(idempotency_key="order-17", fingerprint="f1"), max_queued=1)
    assert again.id == first.id and again.fingerprint == "f1" and again.idempotency_key == "order-17"
    assert store.keyed("order-17") and not store.keyed("order-99")
    assert store.queue_depth("tiny-t2v") == 1 and [j.id for j in store.list()[0]] == [first.id]
    # Whatever became of it since: a finished job is still the answer.
    claim(store, "w1")
    store.complete(first.id, "w1", {"seed": 1}, TTL)
    assert store.enqueue(make_job(idempotency_key="order-17")).status is JobStatus.COMPLETED
    # Other keys, and no key, make new jobs.
    other = store.enqueue(make_job(idempotency_key="order-18"))
    assert other.id != first.id and store.enqueue(make_job()).id != first.id


def test_an_idempotency_key_whose_job_was_deleted_is_free_again(store: JobStore) -> None:
    first = store.enqueue(make_job(idempotency_key="k"))
    store.request_cancel(first.id, TTL)
    store.delete(first.id)
    assert not store.keyed("k")
    second = store.enqueue(make_job(idempotency_key="k"))
    assert second.id != first.id and store.get(second.id).idempotency_key == "k"
    assert store.enqueue(make_job(idempotency_key="k")).id == second.id


def test_concurrent_creates_under_one_key_make_one_job(store: JobStore) -> None:
    ids: list[str] = []
    start = threading.Barrier(8)

    def create() -> None:
        start.wait()
        ids.append(store.enqueue(make_job(idempotency_key="same")).id)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert store.queue_depth("tiny-t2v") == 1


# ---- claim --------------------------------------------------------------------------------------------------


def test_claim_returns_none_when_nothing_waits(store: JobStore) -> None:
    assert store.claim("tiny-t2v", "w1", LEASE) is None


def test_claim_order_is_priority_then_arrival(store: JobStore) -> None:
    low_a = store.enqueue(make_job(priority=0))
    high_a = store.enqueue(make_job(priority=5))
    low_b = store.enqueue(make_job(priority=0))
    high_b = store.enqueue(make_job(priority=5))
    negative = store.enqueue(make_job(priority=-2))
    order = [claim(store).id for _ in range(5)]
    assert order == [high_a.id, high_b.id, low_a.id, low_b.id, negative.id]
    assert store.claim("tiny-t2v", "w1", LEASE) is None


def test_peek_shows_what_claim_would_take_without_taking_it(store: JobStore) -> None:
    assert store.peek("tiny-t2v") == []
    low = store.enqueue(make_job(priority=0))
    high = store.enqueue(make_job(priority=5))
    cancelled = store.enqueue(make_job(priority=9))
    store.request_cancel(cancelled.id, ttl=60)
    store.enqueue(make_job("tiny-i2v", priority=9))
    assert [j.id for j in store.peek("tiny-t2v", 5)] == [high.id, low.id]
    assert [j.id for j in store.peek("tiny-t2v")] == [high.id]
    assert store.peek("tiny-t2v")[0].request == high.request
    assert store.get(high.id).status is JobStatus.QUEUED and store.queue_depth("tiny-t2v") == 2
    assert claim(store).id == high.id
    assert [j.id for j in store.peek("tiny-t2v", 5)] == [low.id]


def test_claim_only_takes_jobs_of_the_asked_model(store: JobStore) -> None:
    other = store.enqueue(make_job("tiny-i2v", priority=9))
    mine = store.enqueue(make_job("tiny-t2v"))
    assert claim(store, model="tiny-t2v").id == mine.id
    assert store.claim("tiny-t2v", "w1", LEASE) is None
    assert claim(store, model="tiny-i2v").id == other.id


def test_claim_marks_the_job_running_under_a_lease(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claimed = claim(store, "worker-a", now=T0)
    for seen in (claimed, store.get(job.id)):
        assert seen.status is JobStatus.IN_PROGRESS
        assert seen.worker_id == "worker-a"
        assert seen.attempts == 1
        assert seen.started_at == T0
        assert seen.lease_expires_at == T0 + LEASE
        assert seen.request == job.request


# ---- renew / set_progress -----------------------------------------------------------------------------------


def test_renew_extends_the_lease_only_for_the_holder(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1", now=T0)
    assert store.renew(job.id, "w1", LEASE, now=T0 + 20)
    assert store.get(job.id).lease_expires_at == T0 + 20 + LEASE
    assert store.reap(max_attempts=3, ttl=TTL, now=T0 + LEASE + 1) == []  # the renewed lease still holds
    assert not store.renew(job.id, "w2", LEASE, now=T0 + 25)
    assert store.get(job.id).lease_expires_at == T0 + 20 + LEASE
    assert not store.renew("video_missing", "w1", LEASE)


def test_renew_and_progress_say_stop_once_cancel_is_requested(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1")
    assert store.set_progress(job.id, "w1", 0.25, "denoise")
    store.request_cancel(job.id, TTL)
    assert not store.renew(job.id, "w1", LEASE)
    assert not store.set_progress(job.id, "w1", 0.5, "denoise")
    assert store.get(job.id).status is JobStatus.IN_PROGRESS  # until the worker marks it cancelled


def test_set_progress_records_progress_and_stage_for_the_holder_only(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1")
    assert store.set_progress(job.id, "w1", 0.4, "denoise")
    current = store.get(job.id)
    assert (current.progress, current.stage) == (0.4, "denoise")
    assert store.set_progress(job.id, "w1", 0.5)  # no stage: the last one stays
    assert store.get(job.id).stage == "denoise"
    assert not store.set_progress(job.id, "intruder", 0.9, "decode")
    current = store.get(job.id)
    assert (current.progress, current.stage) == (0.5, "denoise")


# ---- complete / fail / mark_cancelled -----------------------------------------------------------------------


def test_complete_only_by_the_holder_and_only_once(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1")
    result = {"seed": 42, "timings": {"total": 1.5}, "video_key": f"{job.id}/video.mp4", "frames": []}
    assert not store.complete(job.id, "w2", result, TTL)
    assert store.get(job.id).status is JobStatus.IN_PROGRESS

    before = time.time()
    assert store.complete(job.id, "w1", result, TTL)
    done = store.get(job.id)
    assert done.status is JobStatus.COMPLETED and done.result == result and done.progress == 1.0
    assert done.stage == "done"
    assert done.completed_at is not None and before <= done.completed_at <= time.time()
    assert done.expires_at == pytest.approx(done.completed_at + TTL)
    assert done.lease_expires_at is None

    assert not store.complete(job.id, "w1", {"seed": 7}, TTL)
    assert not store.fail(job.id, "w1", "generation_failed", "late", TTL)
    assert not store.mark_cancelled(job.id, "w1", TTL)
    assert store.get(job.id).to_dict() == done.to_dict()
    assert not store.complete("video_missing", "w1", result, TTL)


def test_complete_refuses_a_job_whose_cancel_came_while_it_was_stored(store: JobStore) -> None:
    """The cancel arrived after the last denoising step, while the video was decoded or uploaded: it still wins."""
    job = store.enqueue(make_job())
    claim(store, "w1")
    store.request_cancel(job.id, TTL)
    assert not store.complete(job.id, "w1", {"seed": 1}, TTL)
    still = store.get(job.id)
    assert still.status is JobStatus.IN_PROGRESS and still.cancel_requested and still.result is None
    assert store.mark_cancelled(job.id, "w1", TTL)
    assert store.get(job.id).status is JobStatus.CANCELLED


def test_fail_records_the_error_once(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1")
    assert not store.fail(job.id, "w2", "generation_failed", "boom", TTL)
    assert store.fail(job.id, "w1", "generation_failed", "RuntimeError: boom", TTL)
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED
    assert (failed.error_code, failed.error_message) == ("generation_failed", "RuntimeError: boom")
    assert failed.expires_at is not None and failed.completed_at is not None
    assert not store.fail(job.id, "w1", "other", "again", TTL)
    assert not store.complete(job.id, "w1", {}, TTL)
    assert store.get(job.id).error_code == "generation_failed"


def test_mark_cancelled_by_the_holder_once(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1")
    store.request_cancel(job.id, TTL)
    assert not store.mark_cancelled(job.id, "w2", TTL)
    assert store.mark_cancelled(job.id, "w1", TTL)
    cancelled = store.get(job.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.expires_at is not None
    assert not store.mark_cancelled(job.id, "w1", TTL)
    assert store.running_count("tiny-t2v") == 0


# ---- request_cancel -----------------------------------------------------------------------------------------


def test_request_cancel_on_a_queued_job_cancels_it_at_once(store: JobStore) -> None:
    job, later = store.enqueue(make_job()), store.enqueue(make_job())
    cancelled, ended = store.request_cancel(job.id, TTL)
    assert cancelled.status is JobStatus.CANCELLED and ended
    assert cancelled.completed_at is not None and cancelled.expires_at == pytest.approx(cancelled.completed_at + TTL)
    assert store.get(job.id).status is JobStatus.CANCELLED
    assert store.queue_depth("tiny-t2v") == 1 and store.queue_position(job.id) is None
    assert claim(store).id == later.id  # the cancelled job is never handed out
    assert store.claim("tiny-t2v", "w1", LEASE) is None


def test_only_the_cancel_that_ended_a_queued_job_says_so(store: JobStore) -> None:
    """How the API counts a queued job cancelled by several racing requests once."""
    job = store.enqueue(make_job())
    first, first_ended = store.request_cancel(job.id, TTL, now=T0 + 1)
    again, again_ended = store.request_cancel(job.id, TTL, now=T0 + 2)
    assert first_ended and not again_ended
    assert first.completed_at == T0 + 1 and again.completed_at == T0 + 1
    assert again.status is JobStatus.CANCELLED


def test_request_cancel_on_a_running_job_only_flags_it(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1")
    flagged, ended = store.request_cancel(job.id, TTL)
    assert flagged.status is JobStatus.IN_PROGRESS and flagged.cancel_requested and not ended
    assert store.get(job.id).cancel_requested
    assert store.request_cancel(job.id, TTL)[0].cancel_requested  # asking twice changes nothing


def test_request_cancel_on_a_finished_job_returns_it_unchanged(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1")
    store.complete(job.id, "w1", {"seed": 1}, TTL)
    done = store.get(job.id)
    assert store.request_cancel(job.id, TTL) == (done, False)
    assert store.get(job.id).to_dict() == done.to_dict()
    with pytest.raises(JobNotFound):
        store.request_cancel("video_missing", TTL)


def test_a_record_with_a_field_this_release_does_not_know_still_loads() -> None:
    """During a rolling upgrade an older replica reads records a newer one wrote (a new field on the job)."""
    job = make_job()
    assert Job.from_dict({**job.to_dict(), "added_by_a_later_release": 1}) == job


# ---- reap ---------------------------------------------------------------------------------------------------


def test_reap_requeues_an_expired_lease_keeping_attempts_and_place(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1", now=T0)
    later = store.enqueue(make_job())
    assert store.reap(max_attempts=3, ttl=TTL, now=T0 + LEASE - 1) == []
    reaped = store.reap(max_attempts=3, ttl=TTL, now=T0 + LEASE + 1)
    assert [j.id for j in reaped] == [job.id]
    assert reaped[0].status is JobStatus.QUEUED and reaped[0].attempts == 1 and reaped[0].worker_id is None
    assert store.get(job.id).lease_expires_at is None
    assert store.running_count("tiny-t2v") == 0
    assert store.queue_position(job.id) == 1 and store.queue_position(later.id) == 2
    assert later.waiting_since == later.created_at
    assert store.get(job.id).waiting_since == T0 + LEASE + 1  # its wait starts over (queue-wait metric)
    again = claim(store, "w2", now=T0 + 100)
    assert again.id == job.id and again.attempts == 2 and again.waiting_since == T0 + LEASE + 1
    assert not store.complete(job.id, "w1", {}, TTL)  # the first worker lost it for good


def test_a_lease_that_ends_exactly_now_is_not_reaped_yet(store: JobStore) -> None:
    """Redis rounded a lease to the microsecond: one ending at `now` could read as ended just before it and be
    reaped, where SQLite keeps it whole. Both take a lease as ended only once `now` is past it."""
    now, lease = 1_700_000_000.8993092, 7.7
    for _ in range(3):
        job = store.enqueue(make_job())
        claimed = store.claim("tiny-t2v", "w1", lease, now=now)
        assert claimed is not None and claimed.id == job.id
        assert claimed.lease_expires_at == now + lease
        assert store.reap(3, TTL, now=now + lease) == []
        assert [j.id for j in store.reap(3, TTL, now=now + lease + 0.001)] == [job.id]
        store.delete(job.id)
        now += 1 / 3


def test_reap_fails_a_job_that_kept_losing_its_worker(store: JobStore) -> None:
    job = store.enqueue(make_job())
    now = T0
    for attempt in (1, 2):
        assert claim(store, f"w{attempt}", now=now).attempts == attempt
        now += LEASE + 1
        (reaped,) = store.reap(max_attempts=2, ttl=TTL, now=now)
    assert reaped.id == job.id and reaped.status is JobStatus.FAILED
    assert reaped.error_code == "worker_lost"
    assert reaped.error_message is not None and "kept losing its worker" in reaped.error_message
    assert "2 attempts" in reaped.error_message
    assert reaped.expires_at == pytest.approx(now + TTL) and reaped.attempts == 2
    assert store.get(job.id).status is JobStatus.FAILED
    assert store.claim("tiny-t2v", "w3", LEASE, now=now) is None
    assert store.reap(max_attempts=2, ttl=TTL, now=now + 1000) == []


def test_reap_finishes_a_cancel_requested_job_as_cancelled(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1", now=T0)
    store.request_cancel(job.id, TTL)
    (reaped,) = store.reap(max_attempts=3, ttl=TTL, now=T0 + LEASE + 1)
    assert reaped.status is JobStatus.CANCELLED
    assert store.claim("tiny-t2v", "w2", LEASE) is None


# ---- release ------------------------------------------------------------------------------------------------


def test_release_keeps_the_original_place_and_does_not_count_the_attempt(store: JobStore) -> None:
    first = store.enqueue(make_job())
    second = store.enqueue(make_job())
    claim(store, "w1")
    later = store.enqueue(make_job())
    assert not store.release(first.id, "w2")
    before = time.time()
    assert store.release(first.id, "w1")
    released = store.get(first.id)
    assert released.status is JobStatus.QUEUED and released.attempts == 0 and released.worker_id is None
    assert before - 1 <= released.waiting_since <= time.time() + 1  # the hand-back, on the store's clock
    assert not store.release(first.id, "w1")  # no longer running
    assert [store.queue_position(j.id) for j in (first, second, later)] == [1, 2, 3]
    order = [claim(store, "w2") for _ in range(3)]
    assert [j.id for j in order] == [first.id, second.id, later.id]
    assert order[0].attempts == 1


def test_release_refuses_a_cancel_requested_job(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1")
    store.request_cancel(job.id, TTL)
    assert not store.release(job.id, "w1")
    assert store.mark_cancelled(job.id, "w1", TTL)


# ---- queue_position / queue_depth / running_count -----------------------------------------------------------


def test_queue_position_moves_as_jobs_are_claimed_and_priority_overtakes(store: JobStore) -> None:
    jobs = enqueue_many(store, 3)
    other = store.enqueue(make_job("tiny-i2v"))
    assert [store.queue_position(j.id) for j in jobs] == [1, 2, 3]
    assert store.queue_position(other.id) == 1  # places count only the same model's queue
    claim(store)
    assert store.queue_position(jobs[0].id) is None
    assert [store.queue_position(j.id) for j in jobs[1:]] == [1, 2]
    urgent = store.enqueue(make_job(priority=10))
    assert store.queue_position(urgent.id) == 1
    assert [store.queue_position(j.id) for j in jobs[1:]] == [2, 3]
    with pytest.raises(JobNotFound):
        store.queue_position("video_missing")


def test_queue_depth_and_running_count(store: JobStore) -> None:
    enqueue_many(store, 3)
    enqueue_many(store, 2, model="tiny-i2v")
    assert (store.queue_depth("tiny-t2v"), store.running_count("tiny-t2v")) == (3, 0)
    running = claim(store)
    claim(store)
    assert (store.queue_depth("tiny-t2v"), store.running_count("tiny-t2v")) == (1, 2)
    assert (store.queue_depth("tiny-i2v"), store.running_count("tiny-i2v")) == (2, 0)
    store.complete(running.id, "w1", {}, TTL)
    assert (store.queue_depth("tiny-t2v"), store.running_count("tiny-t2v")) == (1, 1)
    assert (store.queue_depth("nothing"), store.running_count("nothing")) == (0, 0)
    assert store.counts("tiny-t2v") == (1, 1, 1) and store.counts("tiny-i2v") == (2, 0, 0)
    assert store.counts("nothing") == (0, 0, 0)


def test_a_worker_holding_two_jobs_is_one_worker_of_demand(store: JobStore) -> None:
    """A worker stores one video (MP4, upload) while it makes the next: it holds two jobs. `demand` counted
    jobs, so an autoscaler started a second GPU pod for one busy worker with nothing waiting."""
    enqueue_many(store, 4)
    for claim_number in (1, 2):  # what the worker's claims are named: `<worker id>/<claim number>`
        claim(store, f"host:7:tiny-t2v:ab12cd/{claim_number}")
    claim(store, "host:8:tiny-t2v:ef34ab/1")
    counts = store.counts("tiny-t2v")
    assert counts == (1, 3, 2) and counts.demand == 3


def test_counts_of_a_job_moving_between_queue_and_worker_add_up_to_one(store: JobStore) -> None:
    """What KEDA scales by (queued + running) read while a job is claimed and handed back over and over, as
    drains and claims do: read as two counts, it was 0 or 2 about half the time on Redis."""
    job = store.enqueue(make_job())
    moving = threading.Event()
    moving.set()

    def claim_and_hand_back() -> None:
        while moving.is_set():
            assert store.claim("tiny-t2v", "w1", 30.0) is not None
            assert store.release(job.id, "w1")

    mover = threading.Thread(target=claim_and_hand_back, daemon=True)
    mover.start()
    try:
        seen = {(c.queued + c.running, c.demand) for c in (store.counts("tiny-t2v") for _ in range(1500))}
    finally:
        moving.clear()
        mover.join(10)
    assert seen == {(1, 1)}


# ---- list / delete / expired --------------------------------------------------------------------------------


def test_list_pages_by_creation_in_both_orders(store: JobStore) -> None:
    ids = [j.id for j in enqueue_many(store, 5)]
    page, more = store.list(limit=2)
    assert [j.id for j in page] == [ids[4], ids[3]] and more
    page, more = store.list(limit=2, after=ids[3])
    assert [j.id for j in page] == [ids[2], ids[1]] and more
    page, more = store.list(limit=2, after=ids[1])
    assert [j.id for j in page] == [ids[0]] and not more

    page, more = store.list(limit=3, order="asc")
    assert [j.id for j in page] == ids[:3] and more
    page, more = store.list(limit=3, after=ids[2], order="asc")
    assert [j.id for j in page] == ids[3:] and not more
    page, more = store.list(limit=2, after=ids[3], order="asc")
    assert [j.id for j in page] == [ids[4]] and not more
    page, more = store.list(limit=5)
    assert [j.id for j in page] == ids[::-1] and not more


def test_list_rejects_a_bad_order_and_an_unknown_cursor(store: JobStore) -> None:
    store.enqueue(make_job())
    with pytest.raises(ValueError):
        store.list(order="sideways")
    with pytest.raises(JobNotFound):
        store.list(after="video_missing")


def test_a_deleted_job_still_serves_as_a_cursor(store: JobStore) -> None:
    """A clean-up loop deletes each page as it reads it, then asks for the page after the last id."""
    ids = [j.id for j in enqueue_many(store, 5)]
    for job_id in ids:
        store.request_cancel(job_id, TTL)
    seen: list[str] = []
    page, more = store.list(limit=2, order="asc")
    while True:
        seen += [job.id for job in page]
        for job in page:
            store.delete(job.id)
        if not more:
            break
        page, more = store.list(limit=2, after=page[-1].id, order="asc")
    assert seen == ids and store.list() == ([], False)

    first, middle, last = (j.id for j in enqueue_many(store, 3))
    store.request_cancel(middle, TTL)
    store.delete(middle)
    assert [j.id for j in store.list(after=middle)[0]] == [first]  # either way the pages run
    assert [j.id for j in store.list(after=middle, order="asc")[0]] == [last]


def test_delete_removes_the_job_everywhere(store: JobStore) -> None:
    job, other = store.enqueue(make_job()), store.enqueue(make_job())
    assert store.delete(job.id).id == job.id
    with pytest.raises(JobNotFound):
        store.get(job.id)
    assert store.queue_depth("tiny-t2v") == 1 and store.queue_position(other.id) == 1
    assert [j.id for j in store.list()[0]] == [other.id]
    assert claim(store).id == other.id
    with pytest.raises(JobNotFound):
        store.delete(job.id)


def test_delete_refuses_a_running_job_until_cancel_is_requested(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1")
    with pytest.raises(InvalidRequest):
        store.delete(job.id)
    assert store.get(job.id).status is JobStatus.IN_PROGRESS
    store.request_cancel(job.id, TTL)
    assert store.delete(job.id).cancel_requested
    assert store.running_count("tiny-t2v") == 0
    assert not store.renew(job.id, "w1", LEASE)  # the worker learns at its next step
    assert store.reap(max_attempts=3, ttl=TTL, now=time.time() + 10 * LEASE) == []


def test_delete_of_a_finished_job(store: JobStore) -> None:
    job = store.enqueue(make_job())
    claim(store, "w1")
    store.complete(job.id, "w1", {}, TTL)
    store.delete(job.id)
    assert store.expired(now=time.time() + 2 * TTL) == []


def test_expired_lists_finished_jobs_past_their_expiry(store: JobStore) -> None:
    finished = []
    for ttl in (10.0, 20.0, 30.0):
        job = store.enqueue(make_job())
        claim(store, "w1")
        store.complete(job.id, "w1", {}, ttl)
        finished.append(job.id)
    store.enqueue(make_job())  # queued jobs never expire
    running = store.enqueue(make_job())
    claim(store, "w1")
    now = time.time()
    assert store.expired(now=now) == []
    assert [j.id for j in store.expired(now=now + 15)] == finished[:1]
    assert [j.id for j in store.expired(now=now + 100)] == finished
    assert [j.id for j in store.expired(now=now + 100, limit=2)] == finished[:2]
    assert [j.id for j in store.expired(now=now + 100, limit=1, skip=1)] == finished[1:2]
    assert running.id not in [j.id for j in store.expired(now=now + 10**9)]


def test_a_deleted_job_is_told_apart_from_one_never_known(store: JobStore) -> None:
    """A download after expiry said only "no job with id": as if the id were a typo."""
    job = store.enqueue(make_job())
    store.delete(job.id)
    with pytest.raises(JobNotFound) as deleted:
        store.get(job.id)
    assert deleted.value.deleted and "no longer exists" in str(deleted.value)
    with pytest.raises(JobNotFound) as unknown:
        store.get(new_job_id())
    assert not unknown.value.deleted and "no job with id" in str(unknown.value)
    # Every call that names a job says so: a cancel or a second delete of a deleted job said "no job with id".
    for call in (
        lambda job_id: store.request_cancel(job_id, ttl=60),
        store.delete,
        store.queue_position,
    ):
        with pytest.raises(JobNotFound) as again:
            call(job.id)
        assert again.value.deleted and "no longer exists" in str(again.value)
        with pytest.raises(JobNotFound) as never:
            call(new_job_id())
        assert not never.value.deleted


class _Undeletable(LocalStorage):
    """Files that refuse to go (a read-only folder, an immutable file, a bucket policy)."""

    def __init__(self, root: Path, stuck: set[str]) -> None:
        super().__init__(root)
        self.stuck = stuck

    def delete_prefix(self, prefix: str) -> None:
        if prefix in self.stuck:
            raise PermissionError(f"[Errno 1] Operation not permitted: {prefix!r}")
        super().delete_prefix(prefix)


def test_jobs_whose_files_cannot_be_deleted_do_not_hold_up_the_rest(store: JobStore, tmp_path: Path) -> None:
    """A sweep read the 100 oldest expired jobs; 100 that could not be deleted kept their place at the head,
    and no job behind them ever expired again."""
    finish_in = 0.05

    def finished() -> str:
        job = store.enqueue(make_job())
        claimed = store.claim("tiny-t2v", "w1", LEASE)
        assert claimed is not None
        store.complete(claimed.id, "w1", {}, finish_in)
        return job.id

    stuck = {finished() for _ in range(expiry.BATCH + 3)}
    time.sleep(0.1)  # the free ones expire after every stuck one
    free = [finished() for _ in range(5)]
    time.sleep(2 * finish_in)
    expiry.delete_expired(store, _Undeletable(tmp_path / "videos", stuck))
    for job_id in free:
        with pytest.raises(JobNotFound):
            store.get(job_id)
    assert all(store.get(job_id).status is JobStatus.COMPLETED for job_id in stuck)  # tried again next round


# ---- concurrency --------------------------------------------------------------------------------------------


def test_concurrent_claimers_take_each_job_exactly_once(store: JobStore) -> None:
    expected = {j.id for j in enqueue_many(store, 200)}
    claimed: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def claim_loop(slot: int) -> None:
        start.wait()
        while (job := store.claim("tiny-t2v", f"w{slot}", LEASE)) is not None:
            claimed[slot].append(job.id)

    threads = [threading.Thread(target=claim_loop, args=(slot,)) for slot in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    everything = [job_id for ids in claimed for job_id in ids]
    assert len(everything) == 200 and set(everything) == expected
    assert store.running_count("tiny-t2v") == 200 and store.queue_depth("tiny-t2v") == 0


def _claim_in_process(path: str, worker: str, start: Any, out: Any) -> None:
    store = SQLiteJobStore(path)
    start.wait()
    ids = []
    while (job := store.claim("tiny-t2v", worker, LEASE)) is not None:
        ids.append(job.id)
    store.close()
    out.put(ids)


def test_sqlite_claims_are_exclusive_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SQLiteJobStore(path)
    expected = {j.id for j in enqueue_many(store, 200)}
    # spawn, not fork: every process opens the file on its own, as separate `wanserve worker`s do.
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(4), ctx.Queue()
    processes = [ctx.Process(target=_claim_in_process, args=(str(path), f"p{n}", start, out)) for n in range(4)]
    for process in processes:
        process.start()
    results = [out.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == 0
    everything = [job_id for ids in results for job_id in ids]
    assert len(everything) == 200 and set(everything) == expected
    assert store.running_count("tiny-t2v") == 200
    store.close()


def test_sqlite_closes_the_connections_of_threads_that_ended(tmp_path: Path) -> None:
    """The API's worker threads come and go (anyio ends an idle one after 10 s): each opened a connection that
    stayed open, burst after burst, until the process had no file descriptors left and every request answered
    503 store_unavailable for good."""
    import os
    import threading

    store = SQLiteJobStore(tmp_path / "jobs.db")
    job = store.enqueue(make_job())

    def open_files() -> int:  # this store's file alone: other tests' stores in this process come and go
        return sum(1 for fd in os.listdir("/proc/self/fd") if _target(fd).startswith(str(tmp_path / "jobs.db")))

    def _target(fd: str) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    try:
        counts = []
        for _burst in range(6):
            threads = [threading.Thread(target=store.get, args=(job.id,)) for _ in range(20)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            counts.append(open_files())
        # SQLite keeps a closed connection's descriptors for the next one to reuse (POSIX locks are per
        # process): bounded by one burst's threads, not growing with every burst (203 after five).
        assert counts[-1] - counts[1] < 20 and max(counts) < 60, counts  # before: 40 more a burst, to 243
    finally:
        store.close()


def _open_and_enqueue(url: str, start: Any, answers: Any) -> None:
    from wanserve.jobs import open_store

    start.wait(60)
    try:
        open_store(url).enqueue(make_job())
        answers.put("")
    except Exception as exc:
        answers.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_sqlite_store_together_wait_for_each_other(tmp_path: Path) -> None:
    """An API and workers started together on a fresh data dir: turning on WAL does not wait in SQLite's busy
    handler, and one of them ended at start with "database is locked" (3 to 4 % of opens here)."""
    # Forked from a clean server process, not from pytest's: a fork of this one, with other tests' threads
    # running, can inherit a lock one of them held, and never return (it hung CI's pytest at exit once).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["wanserve.jobs", __name__])
    failures = []
    for n in range(40):
        url, answers, start = f"sqlite:///{tmp_path / f'new-{n}.db'}", context.Queue(), context.Barrier(3)
        processes = [
            context.Process(target=_open_and_enqueue, args=(url, start, answers), daemon=True) for _ in range(3)
        ]
        try:
            for process in processes:
                process.start()
            failures += [answer for answer in (answers.get(timeout=60) for _ in processes) if answer]
        finally:
            for process in processes:
                process.join(10)
                if process.is_alive():
                    process.kill()
    assert failures == []


# ---- durability ---------------------------------------------------------------------------------------------

_ENQUEUE_THEN_DIE = """
import os, signal, sys
from wanserve.jobs import Job
from wanserve.jobs.sqlite import SQLiteJobStore
from wanserve.storage.local import LocalStorage
store = SQLiteJobStore(sys.argv[1])
for n in range(3):
    store.enqueue(Job(id=f"video_{n}", model="tiny-t2v", request={"n": n}))
print("acknowledged", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: as if the machine lost the process
"""


def test_sqlite_locked_past_its_busy_timeout_is_the_store_unavailable(tmp_path: Path) -> None:
    """Another process stuck inside a write transaction: callers get StoreUnavailable (the API's 503, a worker's
    wait), not an OperationalError that ended the worker's claim loop and with it `serve`."""
    import sqlite3

    from wanserve.errors import StoreUnavailable

    store = SQLiteJobStore(tmp_path / "jobs.db", busy_timeout=0.2)
    job = store.enqueue(make_job())
    holder = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(
            StoreUnavailable, match="the job store \\(SQLite\\) is locked by another process: database is locked"
        ):
            store.claim("tiny-t2v", "w1", LEASE)
        assert store.get(job.id).status is JobStatus.QUEUED  # readers go on under WAL
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert claim(store).id == job.id
    # A broken database is not an outage to wait out: it stays an error that says what is wrong.
    broken = sqlite3.connect(tmp_path / "jobs.db")
    broken.execute("ALTER TABLE jobs RENAME COLUMN priority TO priority_was")
    broken.close()
    with pytest.raises(sqlite3.OperationalError, match="no column named priority"):
        store.enqueue(make_job())
    store.close()


def test_sqlite_keeps_acknowledged_jobs_after_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "jobs.db"
    done = subprocess.run([sys.executable, "-c", _ENQUEUE_THEN_DIE, str(path)], capture_output=True, text=True)
    assert done.returncode == -9 and "acknowledged" in done.stdout, done.stderr
    reopened = SQLiteJobStore(path)
    assert reopened.queue_depth("tiny-t2v") == 3
    assert [reopened.queue_position(f"video_{n}") for n in range(3)] == [1, 2, 3]
    job = reopened.claim("tiny-t2v", "w1", LEASE)
    assert job is not None and job.id == "video_0" and job.request == {"n": 0}
    reopened.close()


# ---- Redis only ---------------------------------------------------------------------------------------------


def test_redis_publishes_events_on_state_changes(redis_url: str) -> None:
    store = RedisJobStore(redis_url, prefix="events-test")
    listener = redis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(store.events_channel)
    assert store.events_channel == "events-test:events"
    # Wait for the subscription to be live, or the first events could be published before it.
    deadline = time.monotonic() + 5
    while listener.pubsub_numsub(store.events_channel)[0][1] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    job = store.enqueue(make_job())
    claim(store, "w1")
    store.set_progress(job.id, "w1", 0.5, "denoise")
    assert store.complete(job.id, "w1", {"seed": 1}, TTL)

    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    while (not events or events[-1]["status"] != "completed") and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None:
            events.append(json.loads(message["data"]))
    assert [(e["status"], e["progress"], e["stage"]) for e in events] == [
        ("queued", 0, None),
        ("in_progress", 0, None),
        ("in_progress", 0.5, "denoise"),
        ("completed", 1, "done"),
    ]
    assert {e["id"] for e in events} == {job.id}
    pubsub.close()
    listener.close()
    store.close()


def test_redis_prefixes_keep_stores_apart(redis_url: str) -> None:
    blue, green = RedisJobStore(redis_url, prefix="blue"), RedisJobStore(redis_url, prefix="green")
    job = blue.enqueue(make_job())
    assert green.queue_depth("tiny-t2v") == 0 and green.claim("tiny-t2v", "w1", LEASE) is None
    with pytest.raises(JobNotFound):
        green.get(job.id)
    assert blue.queue_depth("tiny-t2v") == 1
    blue.close()
    green.close()


def test_redis_retried_state_change_replays_its_first_reply(redis_url: str) -> None:
    """What redis-py does after a connection breaks mid-script: run it again with the same token."""
    store = RedisJobStore(redis_url)
    first, second = store.enqueue(make_job()), store.enqueue(make_job())
    args = [store.prefix, "tiny-t2v", "w1", repr(T0), repr(T0 + LEASE), 600]
    replies = [store._claim(keys=["wanserve:op:retried"], args=args) for _ in range(2)]
    assert replies[0] == replies[1] and first.id in replies[0]
    assert store.get(first.id).attempts == 1
    assert store.get(second.id).status is JobStatus.QUEUED and store.queue_depth("tiny-t2v") == 1
    store.close()


def test_redis_claim_asked_again_answers_only_with_a_job_its_holder_still_holds(redis_url: str) -> None:
    """A worker cut off from Redis past its lease asks its claim again under the same token: it was answered with
    the kept reply, a job reaped and claimed by another worker meanwhile, and began running it a second time.
    `claimed` reads what a claim took without claiming (a worker stopping in the outage hands it back)."""
    store = RedisJobStore(redis_url)
    job = store.enqueue(make_job())
    first = store.claim("tiny-t2v", "a/1", LEASE, now=T0, op="tok")
    assert first is not None and first.id == job.id
    again = store.claim("tiny-t2v", "a/1", LEASE, now=T0, op="tok")  # its answer lost: the same job
    assert again is not None and again.id == job.id and store.get(job.id).attempts == 1
    assert store.claimed("a/1", "tok") == store.get(job.id) and store.claimed("b/1", "tok") is None
    assert store.claimed("a/1", "never-used") is None
    assert [j.id for j in store.reap(3, TTL, now=T0 + LEASE + 1)] == [job.id]
    taken = store.claim("tiny-t2v", "b/1", LEASE, now=T0 + LEASE + 2)
    assert taken is not None and taken.id == job.id
    assert store.claim("tiny-t2v", "a/1", LEASE, now=T0 + LEASE + 3, op="tok") is None  # not b's job
    assert store.claimed("a/1", "tok") is None
    assert store.get(job.id).worker_id == "b/1" and store.get(job.id).attempts == 2
    store.close()


def test_sqlite_claimed_is_never_a_lost_claim(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    store.enqueue(make_job())
    assert store.claim("tiny-t2v", "a/1", LEASE, now=T0, op="tok") is not None
    assert store.claimed("a/1", "tok") is None  # a transaction commits or raises: nothing to hand back
    store.close()


def test_redis_retried_cancel_still_says_it_ended_the_job(redis_url: str) -> None:
    """The cancel of a queued job whose reply was lost, resent by redis-py: the retry used to find the job
    already cancelled and answer "not ended by this call", and the API never counted that cancel."""
    store = RedisJobStore(redis_url)
    job = store.enqueue(make_job())
    args = [store.prefix, job.id, "", repr(TTL), 600]
    replies = [store._request_cancel(keys=["wanserve:op:cancel-retried"], args=args) for _ in range(2)]
    assert replies[0] == replies[1] and json.loads(replies[1])[0] == 1
    assert store.get(job.id).status is JobStatus.CANCELLED
    store.close()


def test_redis_list_fills_a_page_past_jobs_deleted_while_it_reads(redis_url: str) -> None:
    """A delete landing between the list's two reads (the index, then the records) left a page short, or
    empty with has_more true and no cursor to go on from. Records gone from under the index are stepped over
    and the page filled from further on."""
    store = RedisJobStore(redis_url)
    ids = [store.enqueue(make_job()).id for _ in range(6)]  # seq order: ids[0] oldest
    for gone in (ids[5], ids[4], ids[2]):  # the record deleted, its index entry not yet
        store._redis.delete(store._key("job", gone))
    page, more = store.list(limit=2, order="desc")
    assert [j.id for j in page] == [ids[3], ids[1]] and more
    page, more = store.list(limit=2, order="desc", after=ids[1])
    assert [j.id for j in page] == [ids[0]] and not more
    page, more = store.list(limit=3, order="asc")
    assert [j.id for j in page] == [ids[0], ids[1], ids[3]] and not more
    store.close()


def test_redis_cancels_that_change_nothing_keep_nothing(redis_url: str) -> None:
    """Each cancel kept a copy of the whole job under its one-off token for ten minutes, even of a job long
    finished: a client repeating cancels filled Redis. Only the cancel that changes the job keeps one."""
    store = RedisJobStore(redis_url)
    job = store.enqueue(make_job())

    def tokens() -> int:
        return len(list(store._redis.scan_iter(match=f"{store.prefix}:op:*", count=1000)))

    before = tokens()
    assert store.request_cancel(job.id, TTL)[1]
    assert tokens() == before + 1
    for _ in range(20):
        again, ended = store.request_cancel(job.id, TTL)
        assert again.status is JobStatus.CANCELLED and not ended
    assert tokens() == before + 1
    with pytest.raises(JobNotFound):
        store.request_cancel("video_missing", TTL)
    assert tokens() == before + 1
    store.close()


def test_redis_leases_run_on_the_server_clock(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hosts whose clocks disagree by more than a lease: the one running ahead must not reap the other's
    live job (it used to, at once, and the job ran twice)."""
    store = RedisJobStore(redis_url)
    job = store.enqueue(make_job())
    claimed = store.claim("tiny-t2v", "w1", 5.0)
    assert claimed is not None and claimed.lease_expires_at is not None
    assert abs(claimed.lease_expires_at - (time.time() + 5.0)) < 60  # the server's clock, not T0 or zero

    real_time = time.time
    skewed = real_time() + 120.0
    monkeypatch.setattr(time, "time", lambda: skewed)
    assert store.reap(max_attempts=3, ttl=TTL) == []
    assert store.renew(job.id, "w1", 5.0)
    assert store.get(job.id).status is JobStatus.IN_PROGRESS and store.get(job.id).worker_id == "w1"

    # Nor does it delete results early: expiry is on the server's clock too.
    monkeypatch.setattr(time, "time", real_time)
    assert store.complete(job.id, "w1", {"seed": 1}, ttl=60.0)
    monkeypatch.setattr(time, "time", lambda: skewed)
    assert store.expired() == []
    store.close()


def test_redis_cancels_and_progress_are_dated_by_the_server_clock(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API host whose clock runs a day ahead cancels a queued job: its result used to be dated (and set to
    expire) by that host's clock, so the job read as finished tomorrow and outlived its TTL by a day."""
    store = RedisJobStore(redis_url)
    running, queued = store.enqueue(make_job()), store.enqueue(make_job())
    assert claim(store, "w1").id == running.id
    monkeypatch.setattr(time, "time", lambda: 1e10)  # every host-side reading is far off

    seconds, micros = store._redis.time()
    server_now = seconds + micros / 1e6
    cancelled, ended = store.request_cancel(queued.id, ttl=60.0)
    assert ended and cancelled.completed_at is not None and abs(cancelled.completed_at - server_now) < 60
    assert cancelled.expires_at == pytest.approx(cancelled.completed_at + 60.0)

    assert store.set_progress(running.id, "w1", 0.5)
    assert abs(store.get(running.id).updated_at - server_now) < 60
    flagged, ended = store.request_cancel(running.id, ttl=60.0)
    assert not ended and abs(flagged.updated_at - server_now) < 60
    store.close()


def test_redis_retried_claim_of_the_last_job_replays_it(redis_url: str) -> None:
    """A claim that emptied the queue, resent by redis-py after a broken connection: the retry used to meet the
    empty queue first and answer "nothing", leaving the job held by a worker that did not know it."""
    store = RedisJobStore(redis_url)
    job = store.enqueue(make_job())
    args = [store.prefix, "tiny-t2v", "w1", repr(T0), repr(LEASE), 600]
    replies = [store._claim(keys=["wanserve:op:last-one"], args=args) for _ in range(2)]
    assert replies[0] == replies[1] and job.id in replies[1]
    store.close()


def test_redis_ping_is_true_for_probes_that_overlap(redis_url: str) -> None:
    """Readiness probes arriving together (a balancer and Kubernetes, probing every replica) were refused a
    connection by the probe's small pool and reported the store unreachable while Redis was fine."""
    from concurrent.futures import ThreadPoolExecutor

    store = RedisJobStore(redis_url)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: store.ping(), range(64)))
    assert answers == [True] * 64
    store.close()


def test_redis_ping_is_false_when_the_server_is_unreachable() -> None:
    store = RedisJobStore(f"redis://127.0.0.1:{free_tcp_port()}/0")
    started = time.monotonic()
    assert store.ping() is False
    assert time.monotonic() - started < 5
    store.close()


# ---- open_store ---------------------------------------------------------------------------------------------


def test_open_store_picks_the_backend_by_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    absolute = open_store(f"sqlite:///{tmp_path / 'abs' / 'jobs.db'}")
    assert isinstance(absolute, SQLiteJobStore) and (tmp_path / "abs" / "jobs.db").exists()
    absolute.close()

    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///rel/jobs.db")
    assert isinstance(relative, SQLiteJobStore) and (tmp_path / "rel" / "jobs.db").exists()
    relative.close()

    remote = open_store(redis_url)
    assert isinstance(remote, RedisJobStore) and remote.ping()
    remote.close()


@pytest.mark.parametrize("url", ["postgres://db/jobs", "jobs.db", "sqlite://", "sqlite:///", "file:///x.db"])
def test_open_store_rejects_other_urls_naming_the_accepted_schemes(url: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(url)
    assert repr(url) in str(info.value) and "redis://" in str(info.value) and "sqlite:///" in str(info.value)


def test_sqlite_creates_missing_parent_directories(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "a" / "b" / "jobs.db")
    assert store.ping() and (tmp_path / "a" / "b" / "jobs.db").exists()
    store.close()
    assert os.path.isdir(tmp_path / "a" / "b")
