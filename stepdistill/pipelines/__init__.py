"""Export of students to diffusers pipeline folders and loading them back."""
from stepdistill.pipelines.export import RECIPE_FILE, export_student_pipeline, load_exported

__all__ = ["RECIPE_FILE", "export_student_pipeline", "load_exported"]
