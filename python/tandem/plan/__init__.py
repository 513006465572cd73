"""The planner behind `tandem plan`: memory and step-time models of TP x PP x DP layouts,
checked against published runs, and the search that turns them into an answer."""

from tandem.plan.estimate import Estimate, PlanError, estimate
from tandem.plan.framework import FRAMEWORKS, Framework
from tandem.plan.layout import Layout
from tandem.plan.model import ModelSpec, load_model
from tandem.plan.presets import MEGATRON_SC21_TABLE1, PRESETS, PublishedRun
from tandem.plan.profiles import PROFILES, DeviceProfile, load_profile

__all__ = ["estimate", "Estimate", "PlanError", "Layout", "ModelSpec", "load_model", "DeviceProfile",
           "load_profile", "PROFILES", "PRESETS", "PublishedRun", "MEGATRON_SC21_TABLE1", "Framework",
           "FRAMEWORKS"]
