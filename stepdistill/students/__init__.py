"""Students: generators that own their sampling (base; flow: a multistep rectified flow), and their backbones
(build, lora)."""
from stepdistill.students.base import Generator, OdeGenerator, RenoiseGenerator, SamplingRecipe
from stepdistill.students.build import build_backbone, build_student, student_schedule
from stepdistill.students.flow import FlowGenerator

__all__ = ["FlowGenerator", "Generator", "OdeGenerator", "RenoiseGenerator", "SamplingRecipe", "build_backbone",
           "build_student", "student_schedule"]
