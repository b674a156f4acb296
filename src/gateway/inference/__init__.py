"""Inference backends: Triton over gRPC (production), onnxruntime in process (embedded)."""
