"""JobStore against a real Redis: a job's lease (one holder, renew and release only by it,
free again when it runs out), checkpoints written with their record, unfinished jobs."""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from services.common.errors import ErrorCode
from services.common.jobs import CHECKPOINT_KEY, JOB_INDEX, JOB_KEY, JobRecord, JobSpec, JobStore, JobUnreadable


@pytest.fixture
def store(own_redis):
    """A database of its own: the mesh's trainers (later e2e tests) must not find these jobs."""
    return JobStore(own_redis)


def _job(state: str = "running", round_no: int = 0) -> JobRecord:
    return JobRecord(spec=JobSpec(model=f"m-{uuid.uuid4().hex[:6]}", rounds=3), state=state, round=round_no)


async def test_one_trainer_holds_a_lease_and_only_it_renews_or_releases_it(store):
    job = _job()
    assert await store.claim(job.id, "trainer-a", 5.0)
    assert not await store.claim(job.id, "trainer-b", 5.0)
    assert await store.renew(job.id, "trainer-a", 5.0)
    assert not await store.renew(job.id, "trainer-b", 5.0)
    await store.release(job.id, "trainer-b")  # not its lease: nothing happens
    assert not await store.claim(job.id, "trainer-b", 5.0)
    await store.release(job.id, "trainer-a")
    assert await store.claim(job.id, "trainer-b", 5.0)


async def test_a_lease_nobody_renews_runs_out_and_another_trainer_takes_it(store):
    job = _job()
    assert await store.claim(job.id, "trainer-a", 0.2)
    await asyncio.sleep(0.4)
    assert await store.claim(job.id, "trainer-b", 5.0)
    assert not await store.renew(job.id, "trainer-a", 5.0)  # the old holder learns it lost it


async def test_a_checkpoint_is_written_with_its_record(store):
    job = _job(round_no=2)
    assert await store.checkpoint(job.id) is None
    await store.save(job, b"weights after round 2")
    assert (await store.get(job.id)).round == 2
    assert await store.checkpoint(job.id) == b"weights after round 2"
    job.round = 3
    await store.save(job)  # a record alone keeps the last checkpoint
    assert await store.checkpoint(job.id) == b"weights after round 2"


async def test_unfinished_lists_pending_running_and_suspended_jobs_only(store):
    jobs = {state: _job(state) for state in ("pending", "running", "suspended", "completed", "failed",
                                             "interrupted")}
    for job in jobs.values():
        await store.save(job)
    unfinished = {j.id for j in await store.unfinished()}
    assert {jobs[s].id for s in ("pending", "running", "suspended")} <= unfinished
    assert not {jobs[s].id for s in ("completed", "failed", "interrupted")} & unfinished


async def test_looking_for_unfinished_jobs_prunes_the_ids_of_expired_records_however_old(store, own_redis):
    """`list` prunes only among the newest 50: older expired ids stayed in the index for good,
    and every trainer read them all again every half lease."""
    old = _job("completed")
    await store.save(old)
    for _ in range(3):
        await store.save(_job("completed"))
    await own_redis.delete(JOB_KEY.format(old.id))  # its TTL ran out
    await store.list(limit=3)
    assert await own_redis.zscore(JOB_INDEX, old.id) is not None  # beyond what list looked at
    await store.unfinished()
    assert await own_redis.zscore(JOB_INDEX, old.id) is None
    assert await own_redis.zcard(JOB_INDEX) == 3


ZEROS = {"mu": 0.0, "server_lr": 0.0, "server_momentum": 0.0, "server_beta2": 0.0, "server_tau": 0.0}


async def test_a_job_s_optional_settings_are_kept_as_given_zero_or_left_out(store):
    given, left_out = JobRecord(spec=JobSpec(**ZEROS)), JobRecord(spec=JobSpec())
    for job in (given, left_out):
        await store.save(job)
    assert (await store.get(given.id)).spec == JobSpec(**ZEROS)
    assert (await store.get(left_out.id)).spec == JobSpec()


async def test_a_record_written_before_optional_settings_reads_their_zeros_as_left_out(store, own_redis):
    """Such a record held 0 for a mu, server_lr, server_beta2 or server_tau left out (and None for
    a server_momentum left out): a trainer taking its job over keeps the strategy's defaults."""
    job = JobRecord(spec=JobSpec(strategy="fedprox", **{**ZEROS, "server_momentum": None}), state="suspended")
    legacy = json.loads(job.to_json())
    del legacy["spec_format"]
    await own_redis.set(JOB_KEY.format(job.id), json.dumps(legacy))
    assert (await store.get(job.id)).spec == JobSpec(strategy="fedprox")


async def test_a_round_written_by_a_newer_trainer_is_read_without_its_unknown_fields(store, own_redis):
    job = JobRecord(spec=JobSpec(model="m"), state="suspended", round=1)
    newer = json.loads(job.to_json())
    newer["history"] = [{"round": 1, "participants": ["edge-1"], "failed": [], "accuracy": 0.5, "loss": 1.0,
                         "seconds": 0.1, "attempt": 1, "client_metrics": {"edge-1": {"loss": 1.0}}}]
    await own_redis.set(JOB_KEY.format(job.id), json.dumps(newer))
    await own_redis.zadd(JOB_INDEX, {job.id: job.created_at})
    assert [r.round for r in (await store.get(job.id)).history] == [1]
    assert [j.id for j in await store.unfinished()] == [job.id]


UNREADABLE = {"not-json": b"{\"spec\": ", "not-an-object": b"[1, 2]",
              "round-missing-fields": json.dumps({"spec": {}, "state": "running", "history": [{"round": 1}]})}


@pytest.mark.parametrize("data", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_an_unreadable_record_is_skipped_by_listings_and_named_by_get(store, own_redis, caplog, data):
    readable = _job("suspended")
    await store.save(readable)
    await own_redis.set(JOB_KEY.format("broken"), data)
    await own_redis.zadd(JOB_INDEX, {"broken": readable.created_at + 1})
    assert [j.id for j in await store.unfinished()] == [readable.id]
    assert [j.id for j in await store.list()] == [readable.id]
    assert "federated job 'broken': its record cannot be read" in caplog.text
    with pytest.raises(JobUnreadable, match="federated job 'broken': its record cannot be read") as info:
        await store.get("broken")
    assert info.value.code == ErrorCode.FAILED_PRECONDITION
    assert await own_redis.zscore(JOB_INDEX, "broken") is not None  # kept: not expired, only unreadable


async def test_a_record_saved_alone_keeps_its_checkpoint_as_long_as_itself(own_redis):
    """A save that keeps the checkpoint refreshed only the record's TTL: a job suspended and taken
    over again and again without a round done outlived its checkpoint, and went on from round 0."""
    job = _job("suspended", round_no=2)
    await JobStore(own_redis, ttl_s=100).save(job, b"weights after round 2")
    await JobStore(own_redis, ttl_s=1000).save(job)
    assert await own_redis.ttl(JOB_KEY.format(job.id)) > 900
    assert await own_redis.ttl(CHECKPOINT_KEY.format(job.id)) > 900
