"""`cnei deploy apply|get|canary|promote|rollback|delete`: ModelDeployment specs in the registry,
and their rollouts (KServe's canary: a share of the requests that name no version)."""
from __future__ import annotations

import argparse
import sys

from services.cli import clients
from services.common.errors import FailedPrecondition, NotFound


async def deploy_apply(args) -> int:
    """Apply a ModelDeployment spec from a YAML or JSON file."""
    import yaml

    from services.common import deployment
    with open(args.file) as fh:
        spec = deployment.check_put(deployment.from_dict(yaml.safe_load(fh)))
    client = clients.registry(args)
    try:
        applied = await client.put_deployment(spec)
        said = await _ensemble_notes(client, applied) if applied.ensemble else []
    finally:
        await client.close()
    print(f"deployment for model '{applied.model}' applied")
    print(deployment.to_json(applied))
    for line in said:
        print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
    return 0


async def _ensemble_notes(client, spec) -> list[str]:
    """What an applied ensemble runs: the version of each step's model ('steps: a:1 -> b:2'), and a
    warning for each step passing a newer version over for a tensor it maps (as the registry logs)."""
    from services.common.deployment import DeploymentSpec
    from services.common.served import newer_versions, passed_over_note, steps_run

    models = sorted({step.model for step in spec.ensemble})
    variants = {model: await client.list(model) for model in models}
    deployments = {d.model: d for d in await client.list_deployments()}
    versions = steps_run(spec, variants, deployments)
    said = ["steps: " + " -> ".join(f"{s.model}:{v}" if v else s.model for s, v in zip(spec.ensemble, versions))]
    for i, (step, version) in enumerate(zip(spec.ensemble, versions)):
        held = variants[step.model]
        if version and held:
            deployed = deployments.get(step.model) or DeploymentSpec(model=step.model)
            if note := passed_over_note(spec.model, i, step, deployed, held, newer_versions(held, version)):
                said.append(f"warning: {note}")
    return said


def rollout_change(spec, verb: str, version: str = "", percent: float = 0.0, variants: list = ()):
    """The rollout of deployment `spec` after `cnei deploy canary|promote|rollback`: a canary of
    `version` taking `percent` % of the requests that name no version; the canary made the stable
    version; the canary dropped. A canary over no pinned stable version pins the latest of the
    model's other versions (`variants`: the model's; `served.latest_version`), the one the
    rest of the requests go to, and that rollback comes back to (an unpinned stable one would
    follow the latest version: the canary itself, when it is the latest). FailedPrecondition when
    there is no canary to promote or roll back, or no other version to keep as the stable one."""
    from dataclasses import replace

    from services.common.served import latest_version

    rollout = spec.rollout
    if verb == "canary":
        stable = rollout.stable
        if not stable:
            try:
                stable = latest_version(spec, [v for v in variants if v.version != version])
            except (NotFound, FailedPrecondition):
                raise FailedPrecondition(f"version {version} is the model's only version with every precision its "
                                         "deployment needs: there is no other to keep as the stable one beside a "
                                         "canary") from None
        return replace(rollout, stable=stable, canary=version, canary_percent=percent)
    if not rollout.canary:
        raise FailedPrecondition(f"there is no canary to {verb} (stable version: {rollout.stable or 'the latest'})")
    if verb == "promote":
        return replace(rollout, stable=rollout.canary, canary="", canary_percent=0.0)
    return replace(rollout, canary="", canary_percent=0.0)


ROLLOUT_ATTEMPTS = 5  # reads and puts of `cnei deploy canary|promote|rollback` racing other puts


async def deploy_rollout(args) -> int:
    """`cnei deploy canary|promote|rollback MODEL`: change the rollout of the model's deployment
    (the defaults when none was applied) and apply it, only over the deployment it read: when
    another was put meanwhile (`cnei deploy apply`), read that one and change it instead."""
    client = clients.registry(args)
    try:
        for _ in range(ROLLOUT_ATTEMPTS):
            if (applied := await _rollout_once(client, args)) is not None:
                break
        else:
            raise FailedPrecondition(f"the deployment of model '{args.model}' kept changing while it was "
                                     f"read and put ({ROLLOUT_ATTEMPTS} times)")
    finally:
        await client.close()
    canary = f", canary v{applied.canary} at {applied.canary_percent:g} %" if applied.canary else ", no canary"
    print(f"model '{args.model}': stable {'v' + applied.stable if applied.stable else 'the latest version'}{canary}")
    return 0


async def _read_deployment(client, model: str):
    """(the model's deployment, else the defaults; its updated_at, else NO_DEPLOYMENT)."""
    from services.common.deployment import DeploymentSpec
    from services.common.registry_client import NO_DEPLOYMENT
    try:
        return await client.read_deployment(model)
    except NotFound:
        return DeploymentSpec(model=model), NO_DEPLOYMENT


async def _rollout_once(client, args):
    """Read the deployment, change its rollout and put it over the one read: the rollout applied,
    or None when another deployment was put meanwhile."""
    from dataclasses import replace

    from services.common.registry_client import NO_DEPLOYMENT

    spec, read_at = await _read_deployment(client, args.model)
    # a canary's version is looked for; a model with no deployment is looked for (an ensemble has one)
    looked_up = args.verb == "canary" or read_at == NO_DEPLOYMENT
    variants = await client.list(args.model) if looked_up else []
    versions = {v.version for v in variants}
    if looked_up and not versions:
        raise NotFound(f"model '{args.model}' not found in the registry")
    if args.verb == "canary" and args.version not in versions:
        raise NotFound(f"model '{args.model}' has no version {args.version} "
                       f"(versions: {', '.join(sorted(versions))})")
    rollout = rollout_change(spec, args.verb, getattr(args, "version", ""), getattr(args, "percent", 0.0), variants)
    try:
        return (await client.put_deployment(replace(spec, rollout=rollout), if_updated_at=read_at)).rollout
    except FailedPrecondition:
        if (await _read_deployment(client, args.model))[1] == read_at:
            raise  # refused for what it asks, not for a put that came between
        return None


async def deploy_delete(args) -> int:
    """`cnei deploy delete MODEL`: delete the model's deployment (a KServe InferenceService
    deleted): the model is served with the default settings afterwards, an ensemble is gone."""
    client = clients.registry(args)
    try:
        deleted = await client.delete_deployment(args.model)
    finally:
        await client.close()
    print(f"deployment of model '{args.model}' deleted: it is served with the default settings now "
          "(an ensemble is gone)")
    print(deleted)
    return 0


async def deploy_show(args) -> int:
    from services.common import deployment
    client = clients.registry(args)
    try:
        specs = [await client.get_deployment(args.model)] if args.model else await client.list_deployments()
    finally:
        await client.close()
    for spec in specs:
        print(deployment.to_json(spec))
    return 0



def add_parser(sub) -> list[argparse.ArgumentParser]:
    """The `deploy` verbs' parsers (every one a registry client)."""
    deploy = sub.add_parser("deploy", help="ModelDeployment specs").add_subparsers(dest="verb", required=True)
    apply = deploy.add_parser("apply", help="apply a deployment spec (YAML or JSON file)")
    apply.add_argument("file")
    show = deploy.add_parser("get", help="show one model's deployment, or all")
    show.add_argument("model", nargs="?", default="")
    canary = deploy.add_parser("canary", help="send a share of the requests that name no version to a canary version")
    canary.add_argument("model")
    canary.add_argument("version")
    canary.add_argument("--percent", type=float, default=10.0, help="share of those requests (default 10)")
    promote = deploy.add_parser("promote", help="make the canary the stable version")
    rollback = deploy.add_parser("rollback", help="drop the canary: every request goes to the stable version")
    for sp in (promote, rollback):
        sp.add_argument("model")
    undeploy = deploy.add_parser(
        "delete", help="delete a model's deployment: the model is served with the default settings afterwards "
                       "(its latest version), an ensemble is gone; refused while another ensemble runs it as a step")
    undeploy.add_argument("model")
    return [apply, show, canary, promote, rollback, undeploy]


VERBS = {"apply": deploy_apply, "get": deploy_show, "canary": deploy_rollout, "promote": deploy_rollout,
         "rollback": deploy_rollout, "delete": deploy_delete}
