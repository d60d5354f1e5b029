"""Distillation objectives, one file per method. REGISTRY maps a config's `objective.name` to its class."""
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup
from stepdistill.objectives.consistency import Consistency
from stepdistill.objectives.dmd2 import DMD2
from stepdistill.objectives.regression import Regression

REGISTRY: dict[str, type[Objective]] = {cls.name: cls for cls in (Regression, DMD2, Consistency)}

__all__ = ["REGISTRY", "Objective", "ObjectiveConfig", "OptimizerGroup"]
