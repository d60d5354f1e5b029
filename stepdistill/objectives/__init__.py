"""Distillation objectives, one file (or family folder) per method; `register` adds one to REGISTRY, which maps a
config's `objective.name` to its class."""
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup, PlanHints
from stepdistill.objectives.boot import Boot
from stepdistill.objectives.consistency import Consistency
from stepdistill.objectives.continuous.meanflow import MeanFlow
from stepdistill.objectives.continuous.rcm import RCM
from stepdistill.objectives.continuous.scd import SCD
from stepdistill.objectives.rectified_flow import FlowGuided, Reflow
from stepdistill.objectives.registry import REGISTRY, build_objective, objective_class, register
from stepdistill.objectives.regression import Regression
from stepdistill.objectives.score_distillation.dmd2 import DMD2
from stepdistill.objectives.score_distillation.fdistill import FDistill
from stepdistill.objectives.score_distillation.ladd import LADD
from stepdistill.objectives.score_distillation.sid import SiD
from stepdistill.objectives.score_distillation.vsd import VSD
from stepdistill.objectives.score_matching import ScoreMatching

for _cls in (Regression, DMD2, Consistency, Boot, VSD, SiD, ScoreMatching, Reflow, FlowGuided, SCD, MeanFlow, RCM,
             FDistill, LADD):
    register(_cls)

__all__ = ["REGISTRY", "Objective", "ObjectiveConfig", "OptimizerGroup", "PlanHints", "build_objective",
           "objective_class", "register"]
