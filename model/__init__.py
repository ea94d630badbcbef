"""PyTorch reference for DeltaDiff / ResShift 4-step SR (the oracle every backend is checked against).

Public API:
    preset, from_upstream_yaml, ModelConfig        -- configs (config.py)
    step_table, StepTable                          -- schedule -> step table (schedule.py)
    Pipeline                                       -- reference pipeline (pipeline.py)
    load_checkpoint                                -- checkpoint loading (checkpoint.py)
"""

from deltadiff.model.config import (
    FAMILIES,
    PRESETS,
    ModelConfig,
    ScheduleConfig,
    UNetConfig,
    VQConfig,
    from_upstream_yaml,
    preset,
)
from deltadiff.model.schedule import StepRow, StepTable, make_step_table, step_table

__all__ = [
    "FAMILIES",
    "PRESETS",
    "ModelConfig",
    "ScheduleConfig",
    "StepRow",
    "StepTable",
    "UNetConfig",
    "VQConfig",
    "from_upstream_yaml",
    "make_step_table",
    "preset",
    "step_table",
]
