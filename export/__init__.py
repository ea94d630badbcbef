"""deltadiff.export: torch -> ONNX graphs (+ the composed unrolled graph), FP16 with FP32 islands,
TensorRT engines, manifests, verification against the PyTorch reference (``dd-export``)."""

__all__ = ["onnx_export", "compose", "fp16", "engine", "verify", "graphs"]
