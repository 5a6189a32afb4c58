"""Benchmarks against onnxruntime.quantization, measured in the same run on the same data."""
