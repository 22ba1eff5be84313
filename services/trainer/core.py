"""Trainer core: federated jobs started, taken over, watched, their leases held and their tasks
stopped (JobTraining trains each); no transport imports."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

from opentelemetry import trace

from services.common.background import Background
from services.common.errors import CneiError, ResourceExhausted, Unavailable
from services.common.jobs import JobRecord, JobSpec, JobStore, LeaseLost
from services.common.nodes import NodeDirectory
from services.common.registry_client import RegistryClient
from services.trainer.evaluation import EvalData, Evaluator, load_eval_data
from services.trainer.job_records import JobRecords, Publish
from services.trainer.job_spec import check_spec
from services.trainer.rounds import TrainFn
from services.trainer.settings import TrainerSettings
from services.trainer.training import JobTraining

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
CANCEL_AGAIN_S = 0.2  # a job is cancelled again after this long until it takes the cancellation


class FederatedTrainer:
    """Starts jobs as kept background tasks, records them in Redis, streams their progress.

    A running job holds a lease in Redis that its trainer renews; after every round the job's
    record and a checkpoint of the global model are written together, only while this trainer
    holds the lease (events are sent only after such a write, versions registered only after
    checking the lease again): a trainer cut off past its lease stops the job and records nothing
    more. A job whose trainer stopped (state `suspended`) or died (its lease ran out) is taken
    over by the next trainer that looks (`resume_unfinished`, at start and every half lease) from
    its last completed round.
    """

    def __init__(self, settings: TrainerSettings, store: JobStore, nodes: NodeDirectory, train: TrainFn,
                 registry: RegistryClient, publish: Publish,
                 eval_data: Callable[[], EvalData] = load_eval_data, owner: str = ""):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.owner = owner or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        self.records = JobRecords(store, self.owner, publish)
        self.training = JobTraining(settings, self.records, nodes, train, registry, Evaluator(eval_data),
                                    closing=lambda: self._closing)
        self._running: dict[str, JobRecord] = {}
        self._starting = 0  # job slots held by jobs being started (see _slot)
        self._closing = False
        self._tasks: dict[str, asyncio.Task] = {}  # the task running each job here
        self._stopping: set[str] = set()  # jobs whose task has taken its cancellation
        self._begun: set[str] = set()  # jobs whose task has begun (one cancelled before would record nothing)
        self.background = Background()

    # --- API --------------------------------------------------------------------------------
    async def start_job(self, spec: JobSpec) -> JobRecord:
        """Check the spec and that the base version exists (NOT_FOUND now, not later), then run.
        Unavailable once the trainer is shutting down, also for a start whose checks were under
        way: nothing is recorded then (close waits for starts under way, see _slot)."""
        check_spec(spec)
        self._refuse_if_closing()
        if not self._free_slots():
            raise ResourceExhausted(f"{len(self._running) + self._starting} federated jobs are running or starting, "
                                    f"the limit is {self.settings.max_running_jobs}: wait for one to end")
        with self._slot():  # taken before the first await: concurrent calls see it
            await self.registry.resolve(spec.model, spec.base_version, "FP32")
            self._refuse_if_closing()
            job = JobRecord(spec=spec)
            await self.store.claim(job.id, self.owner, self.settings.lease_s)  # a new id: always free
            await self.records.save(job)
        self._start(job)
        log.info("federated job %s started: %s", job.id, spec)
        return job

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise Unavailable("the trainer is shutting down: start the job on another trainer")

    def _free_slots(self) -> int:
        return max(0, self.settings.max_running_jobs - len(self._running) - self._starting)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """Hold a job slot while a job is being started (its checks await the registry and Redis);
        given back at the end, where the job, if it starts, takes a slot of its own with no await
        in between. close() waits until no slot is held so: a job started meanwhile is cancelled
        (suspended) with the others, not left running past it."""
        self._starting += 1
        try:
            yield
        finally:
            self._starting -= 1

    async def resume_unfinished(self) -> list[str]:
        """Claim every unfinished job nobody holds and go on with it from its last completed
        round (up to this trainer's job limit); the ids taken."""
        taken = []
        for job in await self.store.unfinished():
            if self._closing:
                break
            if job.id in self._running or not self._free_slots():
                continue
            with self._slot():
                if not await self.store.claim(job.id, self.owner, self.settings.lease_s):
                    continue  # another trainer runs it
                job = await self.store.get(job.id)  # as it is now that this trainer holds it
                if job.done or self._closing:
                    await self.store.release(job.id, self.owner)
                    continue
            log.info("federated job %s (%s, round %d of %d) taken over by %s", job.id, job.state,
                     job.round, job.spec.rounds, self.owner)
            self._start(job)
            taken.append(job.id)
        return taken

    async def keep_resuming(self) -> None:
        """`resume_unfinished` now and every half lease, until cancelled: jobs of a trainer that
        dies are taken over by one still running, not only by the next to start."""
        while True:
            try:
                await self.resume_unfinished()
            except Exception as exc:  # noqa: BLE001 - Redis away: try again next time
                log.warning("could not look for unfinished federated jobs: %s", exc)
            await asyncio.sleep(self.settings.lease_s / 2)

    async def get(self, job_id: str) -> JobRecord:
        return self._running.get(job_id) or await self.store.get(job_id)

    async def list(self) -> list[JobRecord]:
        return await self.store.list()

    async def watch(self, job_id: str, poll_s: float = 1.0) -> AsyncIterator[JobRecord]:
        """The job now, then after each change, until it ends (jobs of other trainers: polled) or,
        while this trainer shuts down, is suspended for another to take over."""
        last = None
        while True:
            job = await self.get(job_id)
            if last is None or job.updated_at != last:
                last = job.updated_at
                yield job
            if job.done or (self._closing and job.state == "suspended"):
                return
            async with self.records.changed:
                try:
                    await asyncio.wait_for(self.records.changed.wait(), poll_s)
                except TimeoutError:
                    pass

    async def close(self) -> None:
        """Refuse new jobs (start_job: Unavailable), wait for starts under way, cancel running
        jobs (each is recorded `suspended` after its last completed round and its lease released,
        for the next trainer) and wait for them."""
        self._closing = True
        # A cancel can be lost on Python 3.11 (asyncio.wait_for, used under nats-py and others,
        # drops one that lands as its future completes): cancel again until each job has taken
        # it (_run_job notes that first thing, and is then left alone to record the suspension).
        while (pending := [t for t in self._tasks.values() if not t.done()]) or self._starting:
            for job_id, task in list(self._tasks.items()):
                if not task.done() and job_id in self._begun and job_id not in self._stopping:
                    task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
            else:  # starts under way: each is refused, or starts a job cancelled next time round
                await asyncio.sleep(CANCEL_AGAIN_S)
        await self.background.wait()

    # --- a job ------------------------------------------------------------------------------
    def _start(self, job: JobRecord) -> None:
        self._running[job.id] = job
        self._tasks[job.id] = self.background.spawn(self._run_job(job))

    async def _run_job(self, job: JobRecord) -> None:
        self._begun.add(job.id)  # from here a cancellation is taken and recorded (see close)
        with _tracer.start_as_current_span("federated.job") as span:
            span.set_attributes({"cnei.job": job.id, "cnei.model": job.spec.model,
                                 "cnei.strategy": job.spec.strategy, "cnei.rounds": job.spec.rounds})
            keeper = asyncio.create_task(self._keep_lease(job, asyncio.current_task()))
            try:
                await self.training.until_settled(job)
            except asyncio.CancelledError:
                self._stopping.add(job.id)  # no more cancels: let the record be written
                if job.id in self.records.lost:
                    self.records.log_lost(job)
                elif not job.done:  # a job already recorded completed or failed stays so
                    with self.records.unless_lost(job):
                        await self.records.suspend(job)
                raise
            except LeaseLost:
                self._stopping.add(job.id)
                self.records.log_lost(job)
            except Exception as exc:  # noqa: BLE001 - recorded on the job
                self._stopping.add(job.id)
                if not isinstance(exc, CneiError):
                    log.exception("federated job %s failed", job.id)
                with self.records.unless_lost(job):
                    await self.records.finish(job, "failed", str(exc))
            finally:
                keeper.cancel()
                self._running.pop(job.id, None)
                self._tasks.pop(job.id, None)
                self._stopping.discard(job.id)
                self._begun.discard(job.id)
                self.records.lost.discard(job.id)
                self.records.checkpoints.pop(job.id, None)
                await self.records.release(job)  # compare-and-set: a lease another trainer took stays its

    async def _keep_lease(self, job: JobRecord, runner: asyncio.Task) -> None:
        """Renew the job's lease every third of it; when another trainer holds it (this one was
        cut off from Redis past the lease), stop the job here: cancelled until it takes the
        cancellation (one can be lost on Python 3.11, see close), and stopped between rounds."""
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            try:
                held = await self.store.renew(job.id, self.owner, self.settings.lease_s)
            except Exception as exc:  # noqa: BLE001 - Redis away: the lease may still hold
                log.warning("federated job %s: could not renew its lease: %s", job.id, exc)
                continue
            if not held:
                break
        self.records.lost.add(job.id)
        while not runner.done() and job.id not in self._stopping:
            runner.cancel()
            await asyncio.wait([runner], timeout=CANCEL_AGAIN_S)
