"""Students: generators that own their sampling (base), and their backbones (build, lora)."""
from stepdistill.students.base import Generator, OdeGenerator, RenoiseGenerator, SamplingRecipe
from stepdistill.students.build import build_backbone, build_student, student_schedule

__all__ = ["Generator", "OdeGenerator", "RenoiseGenerator", "SamplingRecipe", "build_backbone",
           "build_student", "student_schedule"]
