"""Exporters: PyTorch checkpoints -> ONNX (with measured parity) -> TensorRT engines -> Triton repositories."""
