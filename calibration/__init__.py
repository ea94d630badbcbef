"""deltadiff.calibration: INT8 Q/DQ calibration and precision sensitivity search.

``dd-export calibrate`` (``calibrate.py``): timestep-aware ranges from real images (``data.py``,
``ranges.py``), a per-(row, block) sensitivity search (``search.py``), the end-to-end gate
(``evaluate.py``) and two Q/DQ writers from one set of ranges (``qdq.py``: onnxruntime CPU
U8/S8, TensorRT symmetric S8). ``dd-export fp16 --auto-islands`` (``islands.py``) runs the same
search with FP16 as the lower precision. Needs onnx + onnxruntime (no torch).
"""

__all__: list[str] = []
