"""What a federated job leaves in Redis and on the event bus: its record and checkpoint, written
only while this trainer holds the job's lease, the lease checked and released, its ends (suspended,
completed, failed) recorded and announced."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from services.common import events
from services.common.jobs import JobRecord, JobStore, LeaseLost
from services.trainer import transient
from services.trainer.metrics import JOBS

log = logging.getLogger(__name__)
Publish = Callable[[str, dict], Awaitable[object]]


class JobRecords:
    """The records of the jobs this trainer (`owner`) runs, fenced by their leases, and their events."""

    def __init__(self, store: JobStore, owner: str, publish: Publish):
        self.store = store
        self.owner = owner
        self.publish = publish
        self.lost: set[str] = set()  # jobs whose lease another trainer took: stop, record nothing
        self.checkpoints: dict[str, bytes] = {}  # the checkpoint of each job's record in memory (see suspend)
        self.changed = asyncio.Condition()  # notified after each write

    async def save(self, job: JobRecord, saved: bytes | None = None) -> None:
        """Write the job (and checkpoint) fenced by its lease: LeaseLost when another trainer took it."""
        try:
            await self.store.save(job, saved, owner=self.owner)
        except LeaseLost:
            self.lost.add(job.id)
            raise
        async with self.changed:
            self.changed.notify_all()

    async def check_lease(self, job: JobRecord) -> None:
        """LeaseLost unless this trainer still holds the job's lease (before acting for the job
        outside Redis with no fenced write just before: registry pushes)."""
        if job.id in self.lost or not await self.store.holds(job.id, self.owner):
            self.lost.add(job.id)
            raise LeaseLost(job.id, self.owner)

    @staticmethod
    def log_lost(job: JobRecord) -> None:
        log.warning("federated job %s: its lease was taken by another trainer; stopped here after round %d, "
                    "recording nothing more", job.id, job.round)

    @contextlib.contextmanager
    def unless_lost(self, job: JobRecord) -> Iterator[None]:
        """Record a stop (suspended, failed) unless the job is another trainer's now."""
        try:
            yield
        except LeaseLost:
            self.log_lost(job)

    async def release(self, job: JobRecord) -> None:
        try:
            await self.store.release(job.id, self.owner)
        except Exception as exc:  # noqa: BLE001 - it runs out on its own
            log.warning("federated job %s: could not release its lease: %s", job.id, exc)

    async def suspend(self, job: JobRecord, why: str = "") -> None:
        """Record the job suspended after its last round, with that round's checkpoint again: the
        cancellation may have stopped the round's own write, leaving the one before in Redis. With
        Redis away, nothing is recorded: the lease runs out and the next trainer goes on after
        the round last recorded."""
        job.state = "suspended"
        job.error = why or (f"the trainer stopped during round {job.round + 1}; the next trainer to look "
                            f"goes on after round {job.round}")
        failed = await self.save_unless_away(job)
        if failed is not None:
            log.warning("federated job %s: could not record it suspended (%s); the next trainer goes on after "
                        "the round last recorded once its lease runs out", job.id, failed)
            return
        log.info("federated job %s suspended after round %d of %d", job.id, job.round, job.spec.rounds)

    async def save_unless_away(self, job: JobRecord) -> Exception | None:
        """Record the job (with the checkpoint in memory); Redis away (passing trouble) is
        returned, not raised: the record is written again later, or the lease runs out."""
        try:
            await self.save(job, self.checkpoints.get(job.id))
        except Exception as exc:
            if not transient.is_transient(exc):
                raise
            return exc
        return None

    async def finish(self, job: JobRecord, state: str, error: str = "") -> None:
        job.state, job.error = state, error
        await self.save(job)
        JOBS.labels(job.spec.model, state).inc()
        subject = events.FEDERATED_JOB_COMPLETED if state == "completed" else events.FEDERATED_JOB_FAILED
        await self.event(subject, {"job": job.id, "model": job.spec.model, "state": state, "error": error,
                                   "new_version": job.new_version, "variant_accuracy": job.variant_accuracy,
                                   "rounds": job.round})
        log.info("federated job %s %s%s", job.id, state, f": {error}" if error else "")

    async def event(self, subject: str, payload: dict) -> None:
        try:
            await self.publish(subject, payload)
        except Exception as exc:  # noqa: BLE001 - events are advisory; the record is in Redis
            log.warning("could not publish %s: %s", subject, exc)
