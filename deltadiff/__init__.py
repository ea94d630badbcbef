"""deltadiff-trt: deploy DeltaDiff / ResShift 4-step super-resolution models to ONNX and TensorRT.

This top-level package stays import-light (no torch, no onnxruntime). Subpackages:

- ``deltadiff.model``       PyTorch reference (the oracle)      -- needs torch
- ``deltadiff.export``      torch -> ONNX -> engines, manifests -- needs torch, onnx
- ``deltadiff.runtime``     lean runtime (numpy + onnxruntime / TensorRT), never torch
- ``deltadiff.calibration`` calibration image sets
- ``deltadiff.benchmarks``  latency / quality reports
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
