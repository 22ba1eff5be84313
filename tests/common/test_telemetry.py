"""child_span: a real child span under a recorded parent; none (the parent stands in) under an
unsampled one, whose children would not be recorded anyway."""
from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from services.common import telemetry


def _tracer(sampled: bool) -> tuple[trace.Tracer, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON if sampled else ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return provider.get_tracer("test"), exported


def test_under_a_recorded_parent_a_child_span_is_recorded_with_that_parent():
    tracer, exported = _tracer(sampled=True)
    with tracer.start_as_current_span("parent") as parent:
        with telemetry.child_span(tracer, "child") as child:
            assert child is not parent and child.is_recording()
            assert trace.get_current_span() is child
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert spans["child"].parent.span_id == parent.get_span_context().span_id


def test_under_an_unsampled_parent_no_child_is_made_and_the_parent_stays_current():
    tracer, exported = _tracer(sampled=False)
    with tracer.start_as_current_span("parent") as parent:
        assert telemetry.unsampled()
        with telemetry.child_span(tracer, "child") as child:
            assert child is parent
            assert trace.get_current_span() is parent
            # what goes downstream is still the trace's context
            assert telemetry.inject()["traceparent"].split("-")[1] == format(parent.get_span_context().trace_id, "032x")
    assert exported.get_finished_spans() == ()


def test_without_any_span_a_root_span_is_made_as_the_sampler_says():
    tracer, exported = _tracer(sampled=True)
    assert not telemetry.unsampled()
    with telemetry.child_span(tracer, "root") as root:
        assert root.is_recording()
    assert [s.name for s in exported.get_finished_spans()] == ["root"]


def test_an_unsampled_explicit_context_is_made_current_for_the_block_and_restored_after():
    tracer, _ = _tracer(sampled=False)
    with tracer.start_as_current_span("caller") as caller:
        captured = otel_context.get_current()
    assert trace.get_current_span() is not caller
    with telemetry.child_span(tracer, "batch", context=captured) as span:
        assert span is caller and trace.get_current_span() is caller
    assert trace.get_current_span() is not caller


def test_a_recorded_explicit_context_parents_the_child():
    tracer, exported = _tracer(sampled=True)
    with tracer.start_as_current_span("caller") as caller:
        captured = otel_context.get_current()
    with telemetry.child_span(tracer, "batch", context=captured):
        pass
    batch = next(s for s in exported.get_finished_spans() if s.name == "batch")
    assert batch.parent.span_id == caller.get_span_context().span_id


def test_a_caller_that_sent_no_trace_context_gets_an_unsampled_one_so_no_spans_are_made():
    tracer, exported = _tracer(sampled=True)  # even where every root would be recorded
    ctx = telemetry.caller_context(None)
    span_context = trace.get_current_span(ctx).get_span_context()
    assert span_context.is_valid and not span_context.trace_flags.sampled
    token = otel_context.attach(ctx)
    try:
        with telemetry.child_span(tracer, "fastlane/ModelInfer", kind=trace.SpanKind.SERVER):
            with telemetry.child_span(tracer, "ort.run"):
                pass
    finally:
        otel_context.detach(token)
    assert exported.get_finished_spans() == ()


def test_a_caller_s_sampled_context_is_kept_and_its_spans_recorded():
    tracer, exported = _tracer(sampled=True)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = telemetry.caller_context({"traceparent": traceparent})
    token = otel_context.attach(ctx)
    try:
        with telemetry.child_span(tracer, "fastlane/ModelInfer", kind=trace.SpanKind.SERVER):
            pass
    finally:
        otel_context.detach(token)
    (span,) = exported.get_finished_spans()
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
