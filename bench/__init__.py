"""Benchmark harness: CNEI (edge runtime, coordinator) against in-process ONNX Runtime and MLServer."""
