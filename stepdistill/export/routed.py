"""The routed export of K students (MSD, arXiv 2410.23274): one folder with the partition that routes conditions,
the shared components once and one backbone per student.

    partition/                         partition.json + partition.safetensors (the router)
    vae/ text_encoder/ tokenizer/ ...  the components every student shares, once
    students/<k>/                      student k: its backbone (unet/ or transformer/), model_index.json, its own
                                       stepdistill.json and model card, and relative links to the shared components,
                                       so each student alone is a folder plain diffusers loads
    stepdistill.json                   product "routed": students, partition, sampling (the students' own)

MLP students of the analytic teacher are copied whole into students/<k>/ (they share nothing)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from stepdistill.data.partition import Partition
from stepdistill.export.diffusers_student import RECIPE_FILE
from stepdistill.export.mlp import STUDENT_JSON
from stepdistill.io import atomic_directory

PARTITION_DIR, STUDENTS_DIR = "partition", "students"
BACKBONES = ("unet", "transformer")
# what every student must share for one pipeline call to serve them all
SHARED_RECIPE_KEYS = ("product", "pipeline_class", "teacher", "sampling", "pipeline_kwargs", "num_inference_steps",
                      "guidance_scale")


def student_recipe(folder: Path) -> dict:
    for name in (RECIPE_FILE, STUDENT_JSON):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    raise FileNotFoundError(f"{folder} is not an exported stepdistill student (no {RECIPE_FILE} or {STUDENT_JSON})")


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def export_routed(students: list[str | Path], partition: Partition, folder: str | Path) -> Path:
    """Write the routed export of `students` (the export folder of part k's student at index k) into `folder`,
    atomically; refuses students that do not share their sampling or their non-backbone components."""
    students = [Path(s) for s in students]
    if len(students) != partition.num_parts:
        raise ValueError(f"{len(students)} students for a partition of {partition.num_parts} parts: train one "
                         "student per part")
    recipes = [student_recipe(s) for s in students]
    for key in SHARED_RECIPE_KEYS:
        values = {json.dumps(r.get(key), sort_keys=True) for r in recipes}
        if len(values) > 1:
            raise ValueError(f"the students differ in {key!r} ({sorted(values)[:2]}): a routed export needs students "
                             "of one teacher with one sampling recipe")
    product = recipes[0].get("product", "diffusers")
    with atomic_directory(folder) as tmp:
        partition.save(tmp / PARTITION_DIR)
        layout = _write_diffusers(students, tmp) if product == "diffusers" else _write_copies(students, tmp)
        recipe = {"product": "routed", "student_product": product, "num_students": len(students),
                  "students": [f"{STUDENTS_DIR}/{k}" for k in range(len(students))], "partition": PARTITION_DIR,
                  "rule": partition.rule, **layout,
                  **{k: recipes[0][k] for k in (*SHARED_RECIPE_KEYS[1:], "objective") if k in recipes[0]}}
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
        (tmp / "README.md").write_text(model_card(recipe))
    return Path(folder)


def _write_copies(students: list[Path], root: Path) -> dict:
    for k, student in enumerate(students):
        shutil.copytree(student, root / STUDENTS_DIR / str(k))
    return {}


def _write_diffusers(students: list[Path], root: Path) -> dict:
    index = json.loads((students[0] / "model_index.json").read_text())
    backbone = next(name for name in BACKBONES if name in index)
    shared = sorted(name for name in index if not name.startswith("_") and name != backbone
                    and (students[0] / name).is_dir())
    for name in shared:
        if len({folder_digest(s / name) for s in students}) > 1:
            raise ValueError(f"the students' {name} differ: a routed export shares every component but the "
                             f"{backbone}; train all students from one teacher")
        shutil.copytree(students[0] / name, root / name)
    for k, student in enumerate(students):
        target = root / STUDENTS_DIR / str(k)
        target.mkdir(parents=True)
        for item in student.iterdir():
            if item.name not in shared:
                copy = shutil.copytree if item.is_dir() else shutil.copy2
                copy(item, target / item.name)
        for name in shared:  # relative, so the folder can be moved as a whole
            os.symlink(Path("..") / ".." / name, target / name, target_is_directory=True)
    return {"backbone": backbone, "shared": shared}


def model_card(recipe: dict) -> str:
    k = recipe["num_students"]
    if recipe["student_product"] != "diffusers":
        return (f"# {k} routed students (MSD), exported by stepdistill\n\nMLP students of the analytic teacher: "
                "`stepdistill.pipelines.routed.load_routed_generator(folder, teacher)`.\n")
    args = ", ".join(f"{key}={value!r}" for key, value in recipe["pipeline_kwargs"].items())
    return f"""# {k} routed one-step students (multi-student distillation), exported by stepdistill

Multi-student distillation (MSD, Song et al., ICML 2025, arXiv 2410.23274): the condition space is split into {k}
parts (rule `{recipe['rule']}`, `partition/`) and each part has its own student. The shared components are stored
once; `students/<k>/` holds student k's `{recipe['backbone']}`.

```python
from stepdistill.pipelines.routed import RoutedPipeline   # or: stepdistill.pipelines.load_exported(folder)
pipe = RoutedPipeline.from_pretrained("<this folder>")
images = pipe(["a photo of a cat", "a red sports car"], {args}).images   # in the prompts' order
```

Each prompt goes to the student its partition assigns it (`pipe.route(prompts)`), so a batch costs one
`{recipe['backbone']}` step per image, as a single student does. Every `students/<k>/` is also a plain diffusers
`{recipe['pipeline_class']}` folder (`DiffusionPipeline.from_pretrained("<this folder>/students/0")`; its shared
components are links to this folder's). Teacher: `{recipe['teacher']}`.
"""
