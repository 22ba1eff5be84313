"""Spans recorded in memory for tests, as a service exporting them would record them: the
process's tracer provider is set once (OpenTelemetry allows one), recording root spans only while
a test asks for them (`spans`), as a service with no exporter records none."""
from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler

from services.common import telemetry


class Exporting(Sampler):
    """Root spans are recorded while `on` (a service exporting spans), not otherwise (none)."""

    on = False

    def should_sample(self, *args, **kwargs):
        return (ALWAYS_ON if self.on else ALWAYS_OFF).should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "Exporting"


ROOTS = Exporting()
EXPORTED = InMemorySpanExporter()


@pytest.fixture
def spans(monkeypatch):
    """The spans a service exporting them records, in memory (the process's tracer provider is
    set once, for every test after it: with `on` off it records nothing, as without an exporter)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(sampler=ParentBased(ROOTS))
        provider.add_span_processor(SimpleSpanProcessor(EXPORTED))
        trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider().sampler.get_description().startswith("ParentBased{root:Exporting")
    monkeypatch.setattr(telemetry, "_exporting", True)
    EXPORTED.clear()
    ROOTS.on = True
    yield EXPORTED
    ROOTS.on = False
    EXPORTED.clear()


