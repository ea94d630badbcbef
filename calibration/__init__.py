"""deltadiff.calibration: INT8 calibration (Q/DQ) and FP16 sensitivity search -- not built yet.

``dd-export calibrate`` says so and exits non-zero. FP16 islands are currently fixed data
(``deltadiff/export/fp16_islands.json``); a sensitivity search would append to that list.
"""

__all__: list[str] = []
