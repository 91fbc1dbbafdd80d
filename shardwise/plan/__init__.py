"""Layout planning at any scale from one CPU process: ``plan_layout`` and the ``shardwise-plan`` command.

The engine's own build path runs as "rank r of N" on torch's fake process group with meta tensors
(``fake_world.py``, ``probe.py``): model-state bytes and per-step traffic are the engine's, not a formula's.
Activations (``activations.py``), transient buffers (``buffers.py``), the pipeline schedule (``pipeline.py``) and
a hardware profile (``hardware.py``, ``step_time.py``) complete the picture. See docs/scale.md.
"""

from shardwise.plan.hardware import HardwareProfile, load_profile
from shardwise.plan.models import PRESETS, ModelSource, resolve_model
from shardwise.plan.planner import Plan, PlanError, RankPlan, plan_layout, sample_ranks
from shardwise.plan.report import plan_json, render

__all__ = ["HardwareProfile", "ModelSource", "PRESETS", "Plan", "PlanError", "RankPlan", "load_profile",
           "plan_json", "plan_layout", "render", "resolve_model", "sample_ranks"]
