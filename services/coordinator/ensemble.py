"""Ensembles (Triton's ensemble models, KServe's inference graphs as a sequence): a deployment
whose `ensemble` lists steps, each a registered model fed with the ensemble's inputs and earlier
steps' outputs. Every step is an ordinary request through the coordinator (its own precision
choice, placement, batching, failover, statistics), so a step may be pinned to a tier: split
inference, with a small model at the edge and a larger one in the cloud."""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from opentelemetry import trace

from services.common import oip
from services.common.batcher import request_deadline
from services.common.deployment import JOINT_MODES, PRECISIONS, DeploymentSpec, EnsembleStep
from services.common.ensemble_plan import EnsemblePlan, ensemble_plan, step_mapping_problem
from services.common.errors import CneiError, DeadlineExceeded, FailedPrecondition, InvalidArgument
from services.common.model_spec import ModelVariant, TensorSpec, check_inputs
from services.coordinator.precision import policy_from_params

DEPTH = "cnei_ensemble_depth"  # request parameter: how deep in nested ensembles a step is
MAX_DEPTH = 4
VERSION = "1"  # an ensemble's version (it has no artifact of its own)

_tracer = trace.get_tracer(__name__)
Infer = Callable[[oip.InferRequest, float | None], Awaitable[oip.InferResponse]]
Variant = Callable[[str, str], Awaitable[ModelVariant]]
StepVersion = Callable[[EnsembleStep], Awaitable[str]]  # the version of its model a step runs


def check_request(spec: DeploymentSpec, request: oip.InferRequest) -> tuple[EnsemblePlan, list[str]]:
    """The ensemble's plan and the outputs to answer, or INVALID_ARGUMENT saying what is wrong."""
    plan = ensemble_plan(spec)
    inputs, outputs = plan.inputs, plan.outputs
    missing = [t for t in inputs if t not in request.inputs]
    unknown = sorted(set(request.inputs) - set(inputs))
    if missing or unknown:
        raise InvalidArgument(f"ensemble '{spec.model}' takes inputs {inputs}"
                              + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    wanted = list(request.outputs) or outputs
    bad = [t for t in wanted if t not in outputs]
    if bad:
        raise InvalidArgument(f"ensemble '{spec.model}' has outputs {outputs}, not {bad}")
    return plan, wanted


STEP_CHOSEN = ("tier", "precision", "accuracy_floor", "latency_budget_ms", "joint")  # steps set these


def check_parameters(spec: DeploymentSpec, params: dict) -> None:
    """INVALID_ARGUMENT for a client's `tier`, precision policy (`precision`, `accuracy_floor`,
    `latency_budget_ms`) or `joint` on an ensemble: an invalid value refused as on a model, a
    valid one because an ensemble's steps choose their own (each step's tier and precision, its
    model's deployment), where it was ignored."""
    policy = policy_from_params(params)  # INVALID_ARGUMENT for a number that is none
    checks = {"tier": ("edge", "cloud"), "precision": PRECISIONS, "joint": JOINT_MODES}
    for name in STEP_CHOSEN:
        value = params.get(name)
        if value is None or value == "":
            continue
        shown = policy.precision if name == "precision" else str(value)
        if name in checks and shown not in checks[name]:
            raise InvalidArgument(f"parameter '{name}' must be one of {list(checks[name])}, got {value!r}")
        raise InvalidArgument(f"ensemble '{spec.model}' takes no parameter '{name}' (got {value!r}): its steps "
                              f"choose their own tiers, precisions and joint inference (each step's tier and "
                              f"precision, its model's deployment)")


def nesting_depth(params: dict) -> int:
    """How deep in nested ensembles a request is (its `cnei_ensemble_depth`, 0 when unset)."""
    value = params.get(DEPTH, 0) or 0
    try:
        depth = int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"parameter '{DEPTH}' must be a whole number, got {value!r}") from None
    if depth < 0:
        raise InvalidArgument(f"parameter '{DEPTH}' must not be negative, got {value!r}")
    return depth


def check_depth(spec: DeploymentSpec, depth: int) -> None:
    """FAILED_PRECONDITION for an ensemble reached through `depth` ensembles or more (MAX_DEPTH)."""
    if depth >= MAX_DEPTH:
        raise FailedPrecondition(f"ensemble '{spec.model}' nests ensembles deeper than {MAX_DEPTH} (a cycle?)")


def check_step(where: str, step_model: ModelVariant, reads: list[tuple[str, str]],
               writes: list[tuple[str, str]]) -> None:
    """FAILED_PRECONDITION naming the ensemble's step and tensor when the step maps a tensor its
    model does not have (the deployment, not the client, is at fault)."""
    problem = step_mapping_problem(reads, writes, [t.name for t in step_model.inputs],
                                   [t.name for t in step_model.outputs], step_model.name)
    if problem:
        raise FailedPrecondition(f"{where}: {problem}")


async def run(spec: DeploymentSpec, request: oip.InferRequest, deadline_s: float | None,
              infer: Infer, step_variant: Variant | None = None,
              step_version: StepVersion | None = None) -> oip.InferResponse:
    """Run the steps in order, each through `infer` (the coordinator's), inside one deadline;
    with `step_version`, each step's request names the version it resolves (`served.step_version`),
    else the one the step names; with `step_variant`, each step's mapping is checked against that
    version's tensors, and the ensemble's inputs against the tensors they feed, before step 0
    runs. A step's error keeps its code, its message prefixed with the ensemble and step. The
    answer says where each step ran (`cnei_ensemble`: model@node/precision) and which version of
    its model answered (`cnei_ensemble_versions`: model:version)."""
    plan, wanted = check_request(spec, request)
    depth = nesting_depth(request.parameters)
    check_depth(spec, depth)
    # the gRPC deadline and `timeout_us` (or `timeout`) bound the ensemble as a whole: each step
    # gets what is left of it
    end = request_deadline(request.parameters, deadline_s, float("inf"))
    versions_run = [await _checked_version(spec, i, request, step_variant, step_version, maps)
                    for i, maps in enumerate(plan.maps)]
    tensors = dict(request.inputs)
    served, versions = [], []
    for i, (step, (reads, writes)) in enumerate(zip(spec.ensemble, plan.maps)):
        where = f"ensemble '{spec.model}' step {i} ({step.model})"
        sub = oip.InferRequest(model_name=step.model, model_version=versions_run[i], id=request.id,
                               inputs={m: tensors[t] for m, t in reads},
                               parameters=step_parameters(step, request.parameters, depth),
                               outputs=[m for m, _ in writes])
        left = None if end == float("inf") else end - time.monotonic()
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"deadline passed before {where} could run")
        with _tracer.start_as_current_span("coordinator.ensemble_step") as span:
            span.set_attributes({"cnei.ensemble": spec.model, "cnei.step": i, "cnei.model": step.model})
            try:
                response = await infer(sub, left)
            except CneiError as exc:  # the caller sent no request to the step's model: say which step
                raise CneiError(f"{where}: {exc.message}", exc.code) from exc
        for model_output, tensor in writes:
            if model_output not in response.outputs:
                raise FailedPrecondition(f"{where}: the model has no output '{model_output}'")
            tensors[tensor] = response.outputs[model_output]
        p = response.parameters
        served.append(f"{step.model}@{p.get('cnei_node', '?')}/{p.get('cnei_precision', '?')}")
        versions.append(f"{step.model}:{response.model_version or versions_run[i] or '?'}")
    return oip.InferResponse(model_name=spec.model, model_version=VERSION, id=request.id,
                             outputs={t: tensors[t] for t in wanted},
                             parameters={"cnei_ensemble": " -> ".join(served),
                                         "cnei_ensemble_versions": " -> ".join(versions)})


def step_parameters(step: EnsembleStep, params: dict, depth: int) -> dict:
    """A step's request parameters: the caller's placement ones (region, priority), the step's
    own tier and precision, and its nesting depth."""
    out: dict = {DEPTH: depth + 1}
    for name in ("region", "priority"):
        if name in params:
            out[name] = params[name]
    if step.precision:
        out["precision"] = step.precision
    if step.tier:
        out["tier"] = step.tier
    return out


async def _checked_version(spec: DeploymentSpec, i: int, request: oip.InferRequest, step_variant: Variant | None,
                           step_version: StepVersion | None,
                           maps: tuple[list[tuple[str, str]], list[tuple[str, str]]]) -> str:
    """The version step `i` runs; with `step_variant`, its mapping checked against that version's
    tensors and the ensemble inputs it reads against the model inputs they feed."""
    step, (reads, writes) = spec.ensemble[i], maps
    version = step.version if step_version is None else await step_version(step)
    if step_variant is not None:
        model = await step_variant(step.model, version)
        check_step(f"ensemble '{spec.model}' step {i} ({step.model})", model, reads, writes)
        check_ensemble_inputs(spec, model, reads, request.inputs)
    return version


def check_ensemble_inputs(spec: DeploymentSpec, step_model: ModelVariant, reads: list[tuple[str, str]],
                          inputs: dict) -> None:
    """INVALID_ARGUMENT naming the ensemble and its own tensor (not the step model's) when an
    ensemble input a step reads has another datatype or shape than the model input it feeds
    (Triton checks an ensemble's inputs against its config); batch sizes are checked apart."""
    specs = {t.name: t for t in step_model.inputs}
    fed = [(specs[m], t) for m, t in reads if t in inputs]
    as_ensemble = ModelVariant(spec.model, VERSION, "", "", 0, [TensorSpec(t, s.datatype, s.shape) for s, t in fed], [])
    try:
        check_inputs(as_ensemble, {t: inputs[t] for _, t in fed}, rows=False)
    except InvalidArgument as exc:
        raise InvalidArgument(f"ensemble '{spec.model}': {exc.message}") from None


async def variant(spec: DeploymentSpec, step_variant: Variant, step_version: StepVersion | None = None) -> ModelVariant:
    """What ModelMetadata and ModelConfig show of an ensemble: its tensors typed by the steps'
    models (the version each runs: `step_version`'s, else the one it names; ModelConfig's
    `step_versions` parameter names them, 'model:version -> ...'), batching when every step
    batches."""
    plan = ensemble_plan(spec)
    tensors: dict[str, TensorSpec] = {}
    batch_sizes, versions = [], []
    for i, (step, (reads, writes)) in enumerate(zip(spec.ensemble, plan.maps)):
        where = f"ensemble '{spec.model}' step {i} ({step.model})"
        v = await step_variant(step.model, step.version if step_version is None else await step_version(step))
        check_step(where, v, reads, writes)
        batch_sizes.append(v.max_batch_size)
        versions.append(f"{step.model}:{v.version}")
        ins, outs = {t.name: t for t in v.inputs}, {t.name: t for t in v.outputs}
        for model_tensor, tensor in reads:
            tensors.setdefault(tensor, TensorSpec(tensor, ins[model_tensor].datatype, ins[model_tensor].shape))
        for model_tensor, tensor in writes:
            tensors[tensor] = TensorSpec(tensor, outs[model_tensor].datatype, outs[model_tensor].shape)
    batching = all(batch_sizes)
    def shaped(t: TensorSpec) -> TensorSpec:  # a batching ensemble's tensors lead with the batch dimension
        return TensorSpec(t.name, t.datatype, (-1, *t.shape[1:]) if batching and t.shape else t.shape)
    metadata = {"platform": "ensemble", "steps": " -> ".join(s.model for s in spec.ensemble),
                "step_versions": " -> ".join(versions)}
    if batching:
        metadata["max_batch_size"] = str(min(batch_sizes))
    return ModelVariant(name=spec.model, version=VERSION, precision="", sha256="", size_bytes=0,
                        inputs=[shaped(tensors[t]) for t in plan.inputs], outputs=[shaped(tensors[t]) for t in plan.outputs],
                        format="ensemble", metadata=metadata)
