"""The registry's catalogue as its core reads it: the store's quick calls in threads of their own,
the stored deployments read back, and the naming lock."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from services.common import deployment
from services.common.deployment import DeploymentSpec, EnsembleStep
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.model_spec import ModelVariant
from services.registry.sending import run_in
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)
T = TypeVar("T")
Unreadable = Callable[[str, str, str], str | None]  # a stored deployment's model, JSON, why it no longer reads
CATALOGUE_THREADS = 4  # the store's quick calls; never behind uploads, artifact reads or deltas


def _put_it_again(stored: str, spec_json: str, why: str) -> str:
    """Why the stored deployment of model `stored`, asked for by name, cannot be answered: it no
    longer reads (`why`)."""
    return f"the stored deployment of model '{stored}' no longer reads: {why}; put it again"


class Catalogue:
    """The store's catalogue calls, made in a pool of their own."""

    def __init__(self, store: RegistryStore):
        self.store = store
        self.naming = asyncio.Lock()  # a push's name checked and catalogued, or a deployment checked and stored
        self.executor = ThreadPoolExecutor(CATALOGUE_THREADS, thread_name_prefix="registry-catalogue")

    def close(self) -> None:
        self.executor.shutdown(wait=False)

    async def quick(self, fn: Callable[..., T], *args) -> T:
        """A quick store call, in a thread of the catalogue's."""
        return await run_in(self.executor, fn, *args)

    async def variants(self, name: str = "") -> list[ModelVariant]:
        """The variants (of model `name`, else all) with their measurements."""
        return await self.quick(self.store.variants, name)

    async def deployments(self, model: str = "", refuse_unreadable: Unreadable | None = None,
                          ) -> list[tuple[DeploymentSpec, float]]:
        """The stored deployments (of `model`, else all) with their updated_at; NOT_FOUND when
        `model` has none. One that no longer reads (stored before a check it fails existed: NaN,
        ...) is FAILED_PRECONDITION where `refuse_unreadable` (given its model, JSON and why) says
        why, by default where `model` names it (`_put_it_again`); else it is skipped, logged."""
        rows = await self.quick(self.store.deployments, model)
        if model and not rows:
            raise NotFound(f"no deployment for model '{model}'")
        refuse = refuse_unreadable or (_put_it_again if model else None)
        specs = []
        for name, text, when in rows:
            try:
                specs.append((deployment.from_json(text), when))
            except InvalidArgument as exc:
                if refuse and (problem := refuse(name, text, exc.message)):
                    raise FailedPrecondition(problem) from None
                log.warning("deployment of model '%s' skipped: it no longer reads: %s", name, exc.message)
        return specs

    async def ensemble_steps(self, name: str) -> tuple[EnsembleStep, ...]:
        """The steps of the ensemble deployment named `name`; none when it is no ensemble, or its
        deployment no longer reads (what it was is for its next put to say)."""
        for _, text, _ in await self.quick(self.store.deployments, name):
            try:
                return deployment.from_json(text).ensemble
            except InvalidArgument:
                return ()
        return ()
