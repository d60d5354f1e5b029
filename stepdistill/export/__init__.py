"""Export of trained students by product: a diffusers pipeline folder for students of diffusers teachers
(diffusers_student.py, with the scheduler of schedulers.py and the model card of card.py), MLP weights + JSON for the
analytic teacher (mlp.py).
Objectives with another product (a custom pipeline) override `Objective.export` and write through
`atomic_directory` too; the routed export of K students (MSD, written by the recipe runner) is routed.py. Every
export is written atomically: a crash leaves the previous one or none."""
from __future__ import annotations

from pathlib import Path

from stepdistill.export.diffusers_student import RECIPE_FILE, write_diffusers_student
from stepdistill.export.mlp import load_mlp_student, write_mlp_student
from stepdistill.io import atomic_directory
from stepdistill.students.base import Generator


def export_student(generator: Generator, teacher, folder: str | Path, objective: str = "") -> Path:
    """Write the student into `folder` (atomically) as its teacher allows; returns the folder."""
    write = write_diffusers_student if teacher.pipe is not None else write_mlp_student
    with atomic_directory(folder) as tmp:
        write(generator, teacher, tmp, objective)
    return Path(folder)


__all__ = ["RECIPE_FILE", "export_student", "load_mlp_student"]
