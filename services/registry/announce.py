"""What the registry announces on the event bus once it is stored: a variant published, a version
deleted, a deployment updated; best effort (consumers also poll or resync)."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from services.common import events
from services.common.model_spec import ModelVariant

log = logging.getLogger(__name__)
Publisher = Callable[[str, dict], Awaitable[object]]


class Announcer:
    """The registry's events, published through `publish` (None: none is)."""

    def __init__(self, publish: Publisher | None):
        self.publish = publish

    async def published(self, variant: ModelVariant) -> None:
        await self._publish(events.MODEL_PUBLISHED, {"name": variant.name, "version": variant.version,
                                                     "precision": variant.precision, "sha256": variant.sha256,
                                                     "size_bytes": variant.size_bytes}, variant.key)

    async def deleted(self, name: str, version: str, removed: list[ModelVariant]) -> None:
        await self._publish(events.MODEL_DELETED, {"name": name, "version": version,
                                                   "precisions": sorted(v.precision for v in removed)},
                            f"{name} v{version}")

    async def deployment(self, model: str, **extra: object) -> None:
        """`cnei.deployment.updated` for the model (`extra`: `deleted=True` for a deletion):
        consumers read the deployment again, the defaults where there is none."""
        await self._publish(events.DEPLOYMENT_UPDATED, {"model": model, **extra}, f"model {model}")

    async def _publish(self, subject: str, payload: dict, about: str) -> None:
        """Publish an event of what is stored already, a failure logged naming `about`."""
        if self.publish is None:
            return
        try:
            await self.publish(subject, payload)
        except Exception as exc:  # noqa: BLE001 - stored; the event is best effort
            log.warning("could not publish %s event for %s: %s", subject, about, exc)
