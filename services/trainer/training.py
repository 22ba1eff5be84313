"""Training one federated job, from its record to a registered version: its rounds (retried),
each recorded with its checkpoint; passing infrastructure trouble waited out, then the job
suspended for any trainer to take over."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from services.common import events
from services.common.backoff import Backoff
from services.common.federated import Named, RoundTask, layers_to_named
from services.common.jobs import JobRecord, LeaseLost
from services.common.nodes import NodeDirectory
from services.common.registry_client import RegistryClient
from services.trainer import checkpoint, export, transient
from services.trainer.evaluation import Evaluator
from services.trainer.job_records import JobRecords
from services.trainer.job_spec import strategy_of
from services.trainer.metrics import GLOBAL_ACCURACY, PARTICIPANTS, ROUND_SECONDS, ROUNDS, TRANSIENT_ERRORS
from services.trainer.registering import register_version
from services.trainer.rounds import RoundFailed, RoundOutcome, TrainFn, run_round
from services.trainer.selection import select_clients
from services.trainer.settings import TrainerSettings
from services.trainer.strategy import FedAvg

log = logging.getLogger(__name__)


class JobTraining:
    """Runs a job's training for the trainer (`closing`: whether it is shutting down)."""

    def __init__(self, settings: TrainerSettings, records: JobRecords, nodes: NodeDirectory, train: TrainFn,
                 registry: RegistryClient, evaluator: Evaluator, closing: Callable[[], bool]):
        self.settings = settings
        self.records = records
        self.nodes = nodes
        self.train = train
        self.registry = registry
        self.evaluator = evaluator
        self.closing = closing

    async def until_settled(self, job: JobRecord) -> None:
        """Run the job; after passing infrastructure trouble (transient.is_transient: Redis or the
        registry away) go on from its last completed round after a wait (transient_wait_s,
        doubled up to 30 s), while the trouble lasts less than transient_retry_s (counted afresh
        once a round completes); then suspend it, checkpoint kept, for any trainer to take over
        (this one too, once it looks again). Any other error is the job's own: raised."""
        backoff, at_round = None, -1
        while True:
            try:
                await self._train_and_publish(job)
                return
            except Exception as exc:
                if not transient.is_transient(exc):
                    raise
                if backoff is None or job.round != at_round:  # a new spell of trouble
                    backoff = Backoff(first_s=self.settings.transient_wait_s, max_s=transient.MAX_WAIT_S,
                                      limit_s=self.settings.transient_retry_s)
                    at_round = job.round
                now = time.monotonic()
                wait = backoff.next_wait(now)
                if wait is None:
                    TRANSIENT_ERRORS.labels(job.spec.model, "suspended").inc()
                    log.warning("federated job %s: infrastructure still failing after %.0f s (%s); suspending it "
                                "after round %d", job.id, backoff.elapsed(now), exc, job.round)
                    await self.records.suspend(job, f"suspended after round {job.round}: Redis or the registry "
                                                    f"failed for {backoff.elapsed(now):.0f} s ({type(exc).__name__}: "
                                                    f"{exc}); the next trainer to look goes on after round {job.round}")
                    return
                await self._note_retry(job, exc, wait, backoff.elapsed(now))
                await asyncio.sleep(wait)

    async def _note_retry(self, job: JobRecord, exc: Exception, wait: float, elapsed: float) -> None:
        """Count, log and (when Redis answers) record that the job waits to try again."""
        TRANSIENT_ERRORS.labels(job.spec.model, "retried").inc()
        log.warning("federated job %s: %s: %s; trying again after round %d in %.2g s (trouble for %.0f s, "
                    "suspended after %g s)", job.id, type(exc).__name__, exc, job.round, wait, elapsed,
                    self.settings.transient_retry_s)
        job.state = "running"  # not ended: a completion whose write failed is recorded again
        job.error = (f"{type(exc).__name__}: {exc}; trying again after round {job.round} in {wait:.2g} s "
                     f"(suspended if Redis or the registry still fails after {self.settings.transient_retry_s:g} s)")
        await self.records.save_unless_away(job)

    async def _train_and_publish(self, job: JobRecord) -> None:
        """Run the job from its record in memory: after a round done here (its checkpoint in
        memory: the write may have failed), else from Redis's checkpoint (taken over), else from
        its base version."""
        spec = job.spec
        strategy = strategy_of(spec)
        saved = self.records.checkpoints.get(job.id)
        if saved is None and job.round > 0:
            saved = await self.records.store.checkpoint(job.id)
        if saved is not None:  # go on after the last completed round
            weights, state = checkpoint.decode(saved)
            strategy.restore(state)
            self.records.checkpoints[job.id] = saved
            log.info("federated job %s goes on after round %d of %d", job.id, job.round, spec.rounds)
        else:
            base = await self.registry.resolve(spec.model, job.base_version or spec.base_version, "FP32")
            job.base_version, job.round, job.history = base.version, 0, []
            layers = await asyncio.to_thread(export.weights_from_onnx,
                                             await self.registry.fetch_artifact(base.sha256))
            weights = layers_to_named(layers)
        job.state, job.error = "running", ""
        # the record and the checkpoint it stands on
        await self.records.save(job, self.records.checkpoints.get(job.id))
        for round_no in range(job.round + 1, spec.rounds + 1):
            self._stop_if_stopped(job)
            weights = await self._round_with_retries(job, round_no, weights, strategy)
        self._stop_if_stopped(job)
        await register_version(self.registry, job, weights, await self.evaluator.data(),
                               Path(self.settings.data_dir) / job.id, functools.partial(self.records.check_lease, job))
        await self.records.finish(job, "completed")  # drops the checkpoint with the record

    def _stop_if_stopped(self, job: JobRecord) -> None:
        """Between rounds, stop a job whose lease another trainer took (LeaseLost), or any job of
        a trainer shutting down (suspended by FederatedTrainer._run_job), even if the cancellation sent was lost:
        on Python 3.11, asyncio.wait_for (under nats-py's publish, say) drops a cancel that lands
        as its awaited future completes."""
        if job.id in self.records.lost:
            raise LeaseLost(job.id, self.records.owner)
        if self.closing():
            raise asyncio.CancelledError("the trainer is shutting down")

    async def _round_with_retries(self, job: JobRecord, round_no: int, weights: Named, strategy: FedAvg) -> Named:
        for attempt in range(1, self.settings.round_retries + 2):
            self._stop_if_stopped(job)
            try:
                outcome = await self._round(job, round_no, attempt, weights, strategy)
            except RoundFailed as exc:
                ROUNDS.labels(job.spec.model, "failed").inc()
                log.warning("job %s: %s (attempt %d)", job.id, exc, attempt)
                if attempt > self.settings.round_retries:
                    raise
                await asyncio.sleep(self.settings.retry_wait_s)
                continue
            await self._round_done(job, outcome, strategy)
            return outcome.weights
        raise AssertionError("unreachable")

    async def _round(self, job: JobRecord, round_no: int, attempt: int, weights: Named,
                     strategy: FedAvg) -> RoundOutcome:
        spec = job.spec
        seed = zlib.crc32(f"{job.id}/{round_no}/{attempt}".encode())
        nodes = select_clients(await self.nodes.live_nodes(), self.settings.client_tier, spec.fraction,
                               spec.min_clients, seed)
        task = RoundTask(job_id=job.id, round=round_no, model=spec.model, weights=weights,
                         local_epochs=spec.local_epochs, lr=spec.lr, batch_size=spec.batch_size,
                         mu=strategy.client_mu, seed=seed)
        timeout = spec.round_timeout_s or self.settings.round_timeout_s
        return await run_round(self.train, self.evaluator.evaluate, strategy, nodes, task, spec.min_clients,
                               timeout, attempt)

    async def _round_done(self, job: JobRecord, outcome: RoundOutcome, strategy: FedAvg) -> None:
        record = outcome.record
        job.round = record.round
        job.history.append(record)
        ROUNDS.labels(job.spec.model, "ok").inc()
        ROUND_SECONDS.observe(record.seconds)
        PARTICIPANTS.observe(len(record.participants))
        GLOBAL_ACCURACY.labels(job.spec.model).set(record.accuracy)
        self.records.checkpoints[job.id] = checkpoint.encode(outcome.weights, strategy.state())
        await self.records.save(job, self.records.checkpoints[job.id])
        log.info("job %s round %d/%d: accuracy %.4f with %s", job.id, record.round, job.spec.rounds,
                 record.accuracy, ",".join(record.participants))
        await self.records.event(events.FEDERATED_ROUND_COMPLETED, {"job": job.id, "model": job.spec.model,
                                                                    **asdict(record)})
