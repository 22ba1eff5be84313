"""What a deployment is checked against before it is stored: the versions and variants it serves,
its joint cloud model, its ensemble steps, and the stored ensembles' steps over its model; and what
a push means to those steps (a version they pass over, one leaving their tensors typed
differently)."""
from __future__ import annotations

from services.common import deployment
from services.common.deployment import DeploymentSpec, EnsembleStep
from services.common.ensemble_plan import ensemble_cycle, ensemble_interface, ensemble_plan, step_mapping_problem
from services.common.ensemble_tensors import StepTensors, inconsistency_over, tensor_inconsistency
from services.common.errors import FailedPrecondition, InvalidArgument, ModelNotFound
from services.common.model_spec import ModelVariant, pick_variant
from services.common.served import (latest_version, needed_precisions, newer_versions, passed_over_note,
                                    passed_over_notes, precision_lacking, precision_problem_over, served_version,
                                    step_versions, tensor_problem_over)
from services.registry.catalogue import Catalogue


def changed_since(model: str, if_updated_at: float, stored_at: float | None) -> str | None:
    """Why a put made on the strength of a read must not replace what is stored now: the stored
    deployment is not the one read (`if_updated_at`: its updated_at; negative: none was stored;
    0: no read, any goes); None when it is."""
    if if_updated_at == 0 or stored_at == if_updated_at or (if_updated_at < 0 and stored_at is None):
        return None
    was = "none" if if_updated_at < 0 else f"the one of updated_at {if_updated_at!r}"
    now = "none" if stored_at is None else f"the one of updated_at {stored_at!r}"
    return (f"the deployment of model '{model}' changed since it was read ({was} then, {now} now): "
            "read it again and make the change to that")


def _check_canary_is_not_the_latest(spec: DeploymentSpec, latest: str) -> None:
    """An unpinned stable version is the latest one (`served.latest_version`): a canary of it
    would then take every request, and rolling it back would leave it serving. INVALID_ARGUMENT."""
    rollout = spec.rollout
    if rollout.canary and not rollout.stable and rollout.canary == latest:
        raise InvalidArgument(f"rollout canary version {latest} is the latest version of model '{spec.model}', "
                              "which an empty stable version also means: pin the stable version")


def missing_precision(spec: DeploymentSpec, variants: list[ModelVariant]) -> str | None:
    """Why the deployment cannot serve: a version it serves requests that name none with (its
    stable one, pinned or the latest, and its canary) lacks the variant its precision policy or
    its joint edge precision names, or no version is the latest (none holds them all); None when
    each has it."""
    rollout = spec.rollout
    try:
        stable = served_version(spec, variants)
    except FailedPrecondition as exc:
        return exc.message
    for role, version in (("stable", stable), ("canary", rollout.canary)):
        for where, precision in needed_precisions(spec).items():
            if version and (problem := precision_lacking(spec.model, version, precision, variants,
                                                         f"deployment field '{where}'", role)):
                return problem
    return None


def _step_versions(where: str, step: EnsembleStep, deployed: DeploymentSpec, variants: list[ModelVariant]) -> list[str]:
    """The versions an ensemble step's requests go to (`served.step_versions`: the stable one first;
    `deployed`: its model's deployment, else the defaults); FAILED_PRECONDITION naming the step
    (`where`) when no version holds the precisions they ask for."""
    try:
        return step_versions(step, deployed, variants)
    except FailedPrecondition as exc:
        raise FailedPrecondition(f"{where}: {exc.message}") from None


def _step_runs(step: EnsembleStep, versions: list[str], variants: list[ModelVariant]) -> list[StepTensors | None]:
    """The tensors of each version an ensemble step runs (`versions`, the stable one first), in the
    variant of its precision (else the model's default one); [None] when none is known (a nested
    ensemble's step)."""
    return [StepTensors.of(pick_variant(variants, step.model, version, step.precision)) for version in versions] \
        or [None]


def _check_tensor_types(spec: DeploymentSpec, runs: list[list[StepTensors | None]]) -> None:
    """INVALID_ARGUMENT when the stable versions an ensemble's steps run (`runs`: per step, the
    tensors of each version it runs, the stable one first) type a tensor differently;
    FAILED_PRECONDITION when a step's model's canary does (its deployment is at fault)."""
    if problem := tensor_inconsistency(spec, [each[0] for each in runs]):
        raise InvalidArgument(problem)
    if problem := inconsistency_over(spec, runs):
        raise FailedPrecondition(problem)


class DeploymentChecks:
    """The checks of a deployment put (or deleted) against what the catalogue holds."""

    def __init__(self, catalogue: Catalogue):
        self.catalogue = catalogue

    async def ensemble(self, spec: DeploymentSpec) -> list[str]:
        """A name of its own, over models the registry has and other ensembles, reaching no cycle;
        a step asking for a precision runs a version that has it (FAILED_PRECONDITION) and is no
        ensemble (INVALID_ARGUMENT: an ensemble's steps name theirs); a step maps tensors the version
        it runs has (INVALID_ARGUMENT), as every version it goes to does (its model's canary, each
        variant: FAILED_PRECONDITION, `served.step_tensor_problem`); the versions the steps run type each
        tensor alike (INVALID_ARGUMENT; with a step's model's canary: FAILED_PRECONDITION,
        `ensemble_tensors.tensor_inconsistency`). What to say of it once stored: each step passing a
        newer version of its model over for a tensor it maps (`served.passed_over_note`)."""
        if await self.catalogue.variants(spec.model):
            raise InvalidArgument(f"'{spec.model}' is a registered model; an ensemble needs a name of its own")
        specs = {s.model: s for s, _ in await self.catalogue.deployments()}
        ensembles = {model: s for model, s in specs.items() if s.ensemble} | {spec.model: spec}
        if cycle := ensemble_cycle(spec.model, ensembles):
            raise InvalidArgument(f"ensemble '{spec.model}' reaches itself: {' -> '.join(cycle)}")
        runs, said = [], []
        for i, (step, (reads, writes)) in enumerate(zip(spec.ensemble, ensemble_plan(spec).maps)):
            where = f"ensemble '{spec.model}' step {i} ({step.model})"
            variants = await self.catalogue.variants(step.model)
            nested = step.model in ensembles and not variants
            if nested:
                if step.version not in ("", "1"):  # an ensemble's one version
                    raise ModelNotFound(step.model, step.version)
                if step.precision:
                    raise InvalidArgument(f"{where}: asks for precision {step.precision}, but '{step.model}' is an "
                                          "ensemble, whose steps name their own")
                inputs, outputs = ensemble_interface(ensembles[step.model])
                versions: list[str] = []  # its own steps' were checked when it was put
            else:
                deployed = specs.get(step.model, DeploymentSpec(step.model))
                pick_variant(variants, step.model, step.version, "")  # NOT_FOUND naming a model or version it lacks
                versions = _step_versions(where, step, deployed, variants)
                if problem := precision_problem_over(step, versions, variants):
                    raise FailedPrecondition(f"{where}: {problem}")
                v = pick_variant(variants, step.model, versions[0], "")  # the stable one it runs
                inputs, outputs = [t.name for t in v.inputs], [t.name for t in v.outputs]
                newer = newer_versions(variants, versions[0])
                if note := passed_over_note(spec.model, i, step, deployed, variants, newer):
                    said.append(note)
            if problem := step_mapping_problem(reads, writes, inputs, outputs, step.model):
                raise InvalidArgument(f"{where}: {problem}")
            if problem := tensor_problem_over(step, versions, variants):  # its canary, each variant
                raise FailedPrecondition(f"{where}: {problem}")
            runs.append(_step_runs(step, versions, variants))
        _check_tensor_types(spec, runs)
        return said

    async def model_deployment(self, spec: DeploymentSpec) -> None:
        """The versions it serves exist with the variants it asks for, and a joint cloud model can
        answer for each."""
        variants = await self.catalogue.variants(spec.model)  # read once, for every check
        pick_variant(variants, spec.model, "", "")  # NOT_FOUND for a model without versions
        pinned = [pick_variant(variants, spec.model, version, "")  # NOT_FOUND naming it
                  for version in sorted({spec.rollout.stable, spec.rollout.canary} - {""})]
        if problem := missing_precision(spec, variants):
            raise FailedPrecondition(problem)
        latest = pick_variant(variants, spec.model, latest_version(spec, variants), "")
        edges = [latest] + pinned
        _check_canary_is_not_the_latest(spec, latest.version)
        await self.steps_over(spec, variants)
        j = spec.joint
        if j.mode == "off" and not j.cloud_model and not j.cloud_version:  # requests may turn joint inference on
            return
        cloud_model = j.cloud_model or spec.model
        cloud_variants = variants if cloud_model == spec.model else await self.catalogue.variants(cloud_model)
        try:
            cloud = pick_variant(cloud_variants, cloud_model, j.cloud_version, j.cloud_precision)
        except ModelNotFound as exc:
            raise InvalidArgument(f"deployment field '{spec.model}.joint.cloud_model': {exc.message}") from None
        for edge in edges:
            outputs = {t.name: t.shape for t in edge.outputs}
            if j.output and j.output not in outputs:
                raise InvalidArgument(f"deployment field '{spec.model}.joint.output': model '{spec.model}' "
                                      f"version {edge.version} has no output '{j.output}' (outputs: {sorted(outputs)})")
            if problems := deployment.joint_mismatches(outputs, {t.name: t.shape for t in cloud.outputs}):
                raise InvalidArgument(f"joint cloud model '{cloud.key}' cannot answer for model '{edge.key}': "
                                      + "; ".join(problems))

    async def steps_over(self, spec: DeploymentSpec, variants: list[ModelVariant]) -> None:
        """FAILED_PRECONDITION when a stored ensemble's step over the deployment's model (`spec`:
        the one put, the defaults when it is deleted) asks for a precision, or maps a tensor, that a
        version the deployment would serve it lacks (`variants`: the model's), or such a version
        types a tensor otherwise than the ensemble's other steps (`inconsistency_over`)."""
        stored, read = [s for s, _ in await self.catalogue.deployments()], {}
        for ensemble in stored:
            over = [(i, step) for i, step in enumerate(ensemble.ensemble) if step.model == spec.model]
            for i, step in over:
                where = f"ensemble '{ensemble.model}' step {i} ({step.model})"
                versions = _step_versions(where, step, spec, variants)
                if problem := (precision_problem_over(step, versions, variants)
                               or tensor_problem_over(step, versions, variants)):
                    raise FailedPrecondition(f"{where}: {problem}")
            if not over:
                continue
            if problem := inconsistency_over(ensemble, await self._runs(ensemble, stored, spec, variants, read)):
                raise FailedPrecondition(problem)

    async def _runs(self, ensemble: DeploymentSpec, stored: list[DeploymentSpec], spec: DeploymentSpec,
                    variants: list[ModelVariant], read: dict[str, list[ModelVariant]],
                    ) -> list[list[StepTensors | None]]:
        """Per step of a stored ensemble, the tensors of each version it would run with `spec` the
        deployment of its model (`variants`: the model's) and the `stored` ones of the others;
        [None] for a step over a nested ensemble or running no version. `read`: the other models'
        variants read so far (a caller going over several ensembles reads each model once)."""
        deployed = {s.model: s for s in stored} | {spec.model: spec}
        runs = []
        for step in ensemble.ensemble:
            if step.model != spec.model and step.model not in read:
                read[step.model] = await self.catalogue.variants(step.model)
            held = variants if step.model == spec.model else read[step.model]
            try:
                versions = step_versions(step, deployed.get(step.model, DeploymentSpec(step.model)), held)
                runs.append(_step_runs(step, versions, held))
            except (FailedPrecondition, ModelNotFound):
                runs.append([None])
        return runs

    async def after_push(self, pushed: ModelVariant) -> list[str]:
        """What to say of the stored ensembles with a step over the pushed variant's model (their
        deployments and the model's variants read once): each step passing the pushed version over
        for a tensor it maps (`served.passed_over_notes`), each ensemble whose steps type a tensor differently
        now that one runs it (`_retyped`)."""
        stored = [spec for spec, _ in await self.catalogue.deployments()]
        ensembles = [spec for spec in stored if any(step.model == pushed.name for step in spec.ensemble)]
        if not ensembles:
            return []
        deployed = next((s for s in stored if s.model == pushed.name), DeploymentSpec(pushed.name))
        variants = await self.catalogue.variants(pushed.name)
        return ([note for e in ensembles for note in passed_over_notes(e, deployed, variants, [pushed.version])]
                + await self._retyped(ensembles, stored, deployed, variants, pushed))

    async def _retyped(self, ensembles: list[DeploymentSpec], stored: list[DeploymentSpec], deployed: DeploymentSpec,
                       variants: list[ModelVariant], pushed: ModelVariant) -> list[str]:
        """Each of the `ensembles` a step of which runs the pushed version (an unpinned step passes
        over a version renaming a tensor, not one retyping it) when its steps then type a tensor
        differently (`tensor_inconsistency`): the ensemble, tensor and models; its requests will
        fail inside a step's model."""
        said, read = [], {}
        for ensemble in ensembles:
            stable = [each[0] for each in await self._runs(ensemble, stored, deployed, variants, read)]
            runs_it = any(t is not None and (t.model, t.version) == (pushed.name, pushed.version) for t in stable)
            if runs_it and (problem := tensor_inconsistency(ensemble, stable)):
                said.append(f"{problem}: its requests will fail (a step runs model '{pushed.name}' version "
                            f"{pushed.version})")
        return said
