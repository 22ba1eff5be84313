"""`cnei train`: start federated jobs and follow them, list them, show one."""
from __future__ import annotations

import argparse
import sys

from services.cli.output import progress, table
from services.trainer.strategy import STRATEGIES


def jobs_table(jobs: list[dict]) -> str:
    """Federated job summaries (services/common/jobs.py JobRecord.summary) as a table."""
    rows = [[j["id"], j["model"], j["state"], f"{j['round']}/{j['rounds']}", ",".join(j["participants"]) or "-",
             "-" if j["accuracy"] is None else f"{j['accuracy']:.4f}", j["new_version"] or "-"] for j in jobs]
    return table(rows, ["JOB", "MODEL", "STATE", "ROUND", "PARTICIPANTS", "ACCURACY", "NEW VERSION"])


def _trainer_stub(channel):
    from services.pb.cnei import trainer_pb2_grpc as tpb_grpc

    return tpb_grpc.TrainerStub(channel)


def start_request(args: argparse.Namespace):
    """The StartJobRequest of `cnei train start`: the optional settings only when given (a 0 given
    is sent as 0; one left out takes the trainer's default)."""
    from services.pb.cnei import trainer_pb2 as tpb
    from services.trainer.convert import OPTIONAL  # named as their flags' destinations

    given = {name: getattr(args, name) for name in OPTIONAL if getattr(args, name) is not None}
    return tpb.StartJobRequest(
        model=args.model, base_version=args.base_version, rounds=args.rounds, min_clients=args.min_clients,
        fraction=args.fraction, local_epochs=args.local_epochs, lr=args.lr, batch_size=args.batch_size,
        strategy=args.strategy, round_timeout_s=args.round_timeout, dp_clip_norm=args.dp_clip_norm,
        dp_noise_multiplier=args.dp_noise_multiplier, **given)


async def train_start(args) -> int:
    """Start a federated job and follow it round by round until it ends."""
    from services.cli import clients
    from services.pb.cnei import trainer_pb2 as tpb
    from services.common.errors import InvalidArgument
    from services.trainer.convert import job_from_proto

    if args.rounds < 1:
        raise InvalidArgument(f"--rounds must be at least 1, not {args.rounds}")
    request = start_request(args)
    async with clients.trainer(args) as channel:
        stub = _trainer_stub(channel)
        job = job_from_proto(await stub.StartJob(request, timeout=10))
        print(f"federated job {job.id} started: {job.spec.model}, {job.spec.rounds} rounds, {job.spec.strategy}")
        show, shown = progress(f"train {job.spec.model}", unit="rounds"), -1
        async for reply in stub.WatchJob(tpb.GetJobRequest(id=job.id)):
            job = job_from_proto(reply)
            if job.round != shown:
                shown, last = job.round, (job.history[-1] if job.history else None)
                note = f" accuracy {last.accuracy:.4f} ({len(last.participants)} clients)" if last else ""
                show(job.round, job.spec.rounds, note)
    if job.round < job.spec.rounds:
        sys.stderr.write("\n")
    if job.state != "completed":
        print(f"job {job.id} {job.state}: {job.error}", file=sys.stderr)
        return 1
    variants = " ".join(f"{p}={a:.4f}" for p, a in sorted(job.variant_accuracy.items()))
    print(f"job {job.id} completed: {job.spec.model} version {job.new_version} registered ({variants})")
    return 0


async def _jobs(args, job_id: str = "") -> list:
    from services.cli import clients
    from services.pb.cnei import trainer_pb2 as tpb
    from services.trainer.convert import job_from_proto

    async with clients.trainer(args) as channel:
        stub = _trainer_stub(channel)
        if job_id:
            return [job_from_proto(await stub.GetJob(tpb.GetJobRequest(id=job_id), timeout=10))]
        return [job_from_proto(j) for j in (await stub.ListJobs(tpb.ListJobsRequest(), timeout=10)).jobs]


async def train_list(args) -> int:
    jobs = await _jobs(args)
    print(jobs_table([j.summary() for j in jobs]) if jobs else "no federated jobs")
    return 0


async def train_status(args) -> int:
    (job,) = await _jobs(args, args.job)
    print(jobs_table([job.summary()]))
    if job.error:
        print(f"error: {job.error}")
    rows = [[r.round, r.attempt, ",".join(r.participants), ",".join(r.failed) or "-", f"{r.accuracy:.4f}",
             f"{r.loss:.4f}", f"{r.seconds:.2f}s"] for r in job.history]
    print()
    print(table(rows, ["ROUND", "ATTEMPT", "PARTICIPANTS", "DROPPED", "ACCURACY", "LOSS", "TIME"]))
    return 0


def add_parser(sub) -> list[argparse.ArgumentParser]:
    """The `train` verbs' parsers."""
    train = sub.add_parser("train", help="federated learning jobs").add_subparsers(dest="verb", required=True)
    start = train.add_parser("start", help="start a federated job and follow its rounds")
    start.add_argument("--model", default="digits")
    start.add_argument("--base-version", default="", help="version to start from (default: latest)")
    start.add_argument("--rounds", type=int, default=3)
    start.add_argument("--min-clients", type=int, default=1)
    start.add_argument("--fraction", type=float, default=1.0, help="share of live edge nodes per round")
    start.add_argument("--local-epochs", type=int, default=1)
    start.add_argument("--lr", type=float, default=0.05)
    start.add_argument("--batch-size", type=int, default=32)
    start.add_argument("--strategy", default="fedavg", choices=list(STRATEGIES))
    # left out (None): the strategy's default; given, 0 included: sent as given
    start.add_argument("--mu", type=float, help="FedProx proximal term (default 0.01)")
    start.add_argument("--server-lr", type=float,
                       help="server learning rate (eta); defaults: FedAvgM 1.0, FedAdam 0.1, FedYogi 0.01, "
                            "FedAdagrad 0.1")
    start.add_argument("--server-momentum", type=float,
                       help="FedAvgM momentum, FedAdam/FedYogi beta1 (default 0.9; 0: no momentum; "
                            "FedAdagrad refuses a non-zero one)")
    start.add_argument("--server-beta2", type=float, help="FedAdam/FedYogi beta2 (default 0.99)")
    start.add_argument("--server-tau", type=float, help="the adaptive optimisers' tau (default 1e-3)")
    start.add_argument("--dp-clip-norm", type=float, default=0.0,
                       help="server-side differential privacy: clip each client's update to this L2 norm (0: off)")
    start.add_argument("--dp-noise-multiplier", type=float, default=0.0,
                       help="Gaussian noise std on the aggregate = this × clip norm / clients")
    start.add_argument("--round-timeout", type=float, default=0.0, help="seconds (0: the trainer's default)")
    lst = train.add_parser("list", help="federated jobs, newest first")
    status = train.add_parser("status", help="one job with its rounds")
    status.add_argument("job")
    for sp in (start, lst, status):
        sp.add_argument("--trainer", default="127.0.0.1:50071")
    return [start, lst, status]


VERBS = {"start": train_start, "list": train_list, "status": train_status}
