"""Federated job records in Redis (`cnei:federated:*`): written by the trainer, read by the
coordinator's status page and the CLI."""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

from redis.asyncio import Redis

from services.common.errors import FailedPrecondition, NotFound
from services.common.records import known_fields

log = logging.getLogger(__name__)
JOB_KEY = "cnei:federated:job:{}"
JOB_INDEX = "cnei:federated:jobs"  # sorted set: job id scored by creation time
CHECKPOINT_KEY = "cnei:federated:checkpoint:{}"  # global model after the job's last round
LEASE_KEY = "cnei:federated:lease:{}"  # the trainer running the job now, while it renews
TERMINAL = ("completed", "failed", "interrupted")
# Records written before SPEC_FORMAT 2 held 0 for these settings when they were left out.
SPEC_FORMAT = 2
_ZERO_WAS_LEFT_OUT = ("mu", "server_lr", "server_beta2", "server_tau")
# A job in one of these states with no lease was left by a trainer that stopped (`suspended`) or
# died (`pending`, `running`): any trainer may claim it and go on from its checkpoint.
UNFINISHED = ("pending", "running", "suspended")

# Compare-and-set on a lease: renew (PEXPIRE) or release (DEL) only while `owner` holds it.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Write a record (KEYS[2]) and with it set, keep or drop its checkpoint (KEYS[3]), indexed (KEYS[4]),
# only while ARGV[1] holds the lease (KEYS[1]); ARGV[1] '' writes unfenced. 1 written, 0 not. A kept
# checkpoint lives as long as its record from then on.
_SAVE = """
if ARGV[1] ~= '' and redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[2], ARGV[2], 'EX', ARGV[3])
if ARGV[6] == 'set' then redis.call('set', KEYS[3], ARGV[7], 'EX', ARGV[3])
elseif ARGV[6] == 'keep' then redis.call('expire', KEYS[3], ARGV[3])
elseif ARGV[6] == 'drop' then redis.call('del', KEYS[3]) end
redis.call('zadd', KEYS[4], ARGV[5], ARGV[4])
return 1
"""


class LeaseLost(FailedPrecondition):
    """A trainer wrote to (or was about to announce) a job whose lease another trainer holds now."""

    def __init__(self, job_id: str, owner: str):
        self.job_id, self.owner = job_id, owner
        super().__init__(f"federated job '{job_id}': {owner} no longer holds its lease (another trainer "
                         f"took the job over); nothing written")


class JobUnreadable(FailedPrecondition):
    """A job's record in Redis cannot be read (corrupt, or of a shape this trainer does not know)."""

    def __init__(self, job_id: str, problem: str):
        self.job_id, self.problem = job_id, problem
        super().__init__(f"federated job '{job_id}': its record cannot be read ({problem}); listings skip it")


@dataclass(frozen=True)
class JobSpec:
    """What a federated job is asked to do."""

    model: str = "digits"
    base_version: str = ""
    rounds: int = 3
    min_clients: int = 1
    fraction: float = 1.0
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    strategy: str = "fedavg"
    # None: the strategy's default; any number, 0 included, is that number.
    mu: float | None = None  # FedProx proximal term (None: 0.01)
    server_momentum: float | None = None  # FedAvgM momentum / FedAdam, FedYogi beta1 (None: 0.9)
    server_lr: float | None = None  # FedAvgM server lr (None: 1) / the adaptive optimisers' eta
    round_timeout_s: float = 0.0
    server_beta2: float | None = None  # FedAdam / FedYogi second-moment decay (None: 0.99)
    server_tau: float | None = None  # adaptive optimisers' epsilon (None: 1e-3; Flower's FedAdam/FedAdagrad: 1e-9)
    dp_clip_norm: float = 0.0  # > 0: server-side differential privacy, updates clipped to this L2 norm
    dp_noise_multiplier: float = 0.0  # Gaussian noise std = multiplier × clip norm / clients


@dataclass
class RoundRecord:
    round: int
    participants: list[str]
    failed: list[str]
    accuracy: float
    loss: float
    seconds: float
    attempt: int = 1

    @classmethod
    def from_dict(cls, obj: dict) -> RoundRecord:
        """A round as recorded; fields a newer trainer added are ignored."""
        return cls(**known_fields(cls, obj))


@dataclass
class JobRecord:
    spec: JobSpec
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "pending"
    round: int = 0
    base_version: str = ""
    history: list[RoundRecord] = field(default_factory=list)
    new_version: str = ""
    error: str = ""
    variant_accuracy: dict[str, float] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "spec_format": SPEC_FORMAT}, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> JobRecord:
        obj = json.loads(data)
        values = known_fields(JobSpec, obj.pop("spec", {}))
        if obj.pop("spec_format", 1) < SPEC_FORMAT:  # a job started before: its 0s were left out
            values.update({k: None for k in _ZERO_WAS_LEFT_OUT if values.get(k) == 0})
        spec = JobSpec(**values)
        history = [RoundRecord.from_dict(r) for r in obj.pop("history", [])]
        return cls(spec=spec, history=history, **known_fields(cls, obj))

    def summary(self) -> dict:
        """The status-page row: id, model, state, round x/y, participants, accuracy, version."""
        last = self.history[-1] if self.history else None
        return {"id": self.id, "model": self.spec.model, "state": self.state, "round": self.round,
                "rounds": self.spec.rounds, "strategy": self.spec.strategy,
                "participants": last.participants if last else [],
                "accuracy": round(last.accuracy, 4) if last else None,
                "base_version": self.base_version, "new_version": self.new_version, "error": self.error,
                "updated_at": self.updated_at}


class JobStore:
    """Save, load and list job records."""

    def __init__(self, redis: Redis, ttl_s: float = 7 * 24 * 3600):
        self.redis = redis
        self.ttl_s = ttl_s

    async def save(self, job: JobRecord, checkpoint: bytes | None = None, owner: str = "") -> None:
        """Write the record, and with it (atomically) the checkpoint it refers to (without one, the
        checkpoint kept is given the record's TTL again); a record that has ended drops its
        checkpoint (nothing goes on from it). With `owner`, fenced by the job's lease: LeaseLost,
        and nothing written, unless `owner` holds it."""
        job.updated_at = time.time()
        mode = "drop" if job.done else "keep" if checkpoint is None else "set"
        keys = [LEASE_KEY.format(job.id), JOB_KEY.format(job.id), CHECKPOINT_KEY.format(job.id), JOB_INDEX]
        written = await self.redis.eval(_SAVE, len(keys), *keys, owner, job.to_json(), int(self.ttl_s), job.id,
                                        repr(job.created_at), mode, checkpoint or b"")
        if not written:
            raise LeaseLost(job.id, owner)

    async def holds(self, job_id: str, owner: str) -> bool:
        """Whether `owner` holds the job's lease now."""
        held = await self.redis.get(LEASE_KEY.format(job_id))
        return held is not None and (held.decode() if isinstance(held, bytes) else held) == owner

    async def checkpoint(self, job_id: str) -> bytes | None:
        return await self.redis.get(CHECKPOINT_KEY.format(job_id))

    async def claim(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Take the job's lease when nobody holds it."""
        return bool(await self.redis.set(LEASE_KEY.format(job_id), owner, nx=True, px=int(lease_s * 1000)))

    async def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend the lease; False when `owner` no longer holds it (it expired and was taken)."""
        return bool(await self.redis.eval(_RENEW, 1, LEASE_KEY.format(job_id), owner, int(lease_s * 1000)))

    async def release(self, job_id: str, owner: str) -> None:
        await self.redis.eval(_RELEASE, 1, LEASE_KEY.format(job_id), owner)

    async def unfinished(self) -> list[JobRecord]:
        """Every kept job that has not ended, oldest first (ids whose record expired are pruned
        from the index)."""
        jobs = await self._records(await self.redis.zrange(JOB_INDEX, 0, -1))
        return [j for j in jobs if j.state in UNFINISHED]

    async def get(self, job_id: str) -> JobRecord:
        data = await self.redis.get(JOB_KEY.format(job_id))
        if data is None:
            raise NotFound(f"federated job '{job_id}' not found")
        return _parse(job_id, data)

    async def list(self, limit: int = 50) -> list[JobRecord]:
        """Newest first; ids whose record expired are pruned from the index."""
        return await self._records(await self.redis.zrevrange(JOB_INDEX, 0, limit - 1))

    async def _records(self, indexed: list) -> list[JobRecord]:
        """The records of these ids from the index, in order; ids whose record expired are taken
        out of the index (else it would grow for good: `unfinished` reads all of it)."""
        ids = [i.decode() if isinstance(i, bytes) else i for i in indexed]
        if not ids:
            return []
        records = await self.redis.mget([JOB_KEY.format(i) for i in ids])
        gone = [i for i, r in zip(ids, records) if r is None]
        if gone:
            await self.redis.zrem(JOB_INDEX, *gone)
        return [job for i, r in zip(ids, records) if r is not None and (job := _readable(i, r)) is not None]


def _parse(job_id: str, data: str | bytes) -> JobRecord:
    """The record of `job_id`; JobUnreadable naming it when it cannot be read."""
    try:
        return JobRecord.from_json(data)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise JobUnreadable(job_id, f"{type(exc).__name__}: {exc}") from None


def _readable(job_id: str, data: str | bytes) -> JobRecord | None:
    """The record of `job_id`, or None (logged) when it cannot be read: one such record must not
    hide the others from listings and from the trainers looking for unfinished jobs."""
    try:
        return _parse(job_id, data)
    except JobUnreadable as exc:
        log.warning("%s", exc)
        return None
