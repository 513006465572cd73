"""The planner behind `tandem plan`: memory and step-time models of TP x PP x DP layouts,
checked against published runs, and the search that turns them into an answer.

``plan(model, gpus=..., global_batch=..., seq_len=..., gpu=...)`` ranks layouts;
``estimate(model, layout, profile, global_batch=..., seq_len=...)`` breaks one down;
``explain`` says why a layout is dropped; ``calibrate`` measures a profile of this machine.
See docs/plan.md for the models, their formulas and sources.
"""

from tandem.plan.calibrate import calibrate
from tandem.plan.estimate import Estimate, PlanError, estimate
from tandem.plan.framework import FRAMEWORKS, Framework
from tandem.plan.layout import Layout
from tandem.plan.model import ModelSpec
from tandem.plan.model_input import load_model
from tandem.plan.presets import MEGATRON_SC21_TABLE1, PRESETS, PublishedRun
from tandem.plan.profiles import PROFILES, DeviceProfile, load_profile
from tandem.plan.saved import saved_activation_bytes
from tandem.plan.search import Plan, explain, plan

__all__ = ["plan", "Plan", "explain", "estimate", "Estimate", "PlanError", "calibrate", "Layout", "ModelSpec",
           "load_model", "DeviceProfile", "load_profile", "PROFILES", "PRESETS", "PublishedRun",
           "MEGATRON_SC21_TABLE1", "Framework", "FRAMEWORKS", "saved_activation_bytes"]
