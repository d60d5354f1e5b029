"""Distillation objectives, one file per method. REGISTRY maps a config's `objective.name` to its class."""
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup
from stepdistill.objectives.regression import Regression

REGISTRY: dict[str, type[Objective]] = {cls.name: cls for cls in (Regression,)}

__all__ = ["REGISTRY", "Objective", "ObjectiveConfig", "OptimizerGroup"]
