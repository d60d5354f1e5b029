"""Which loader opens a pipeline folder for evaluation: an exported student through the one loader of exports
(with its sampling recipe), any other diffusers pipeline folder (a teacher) through `from_pretrained` with an
empty recipe. Kept to one function so that it folds into `load_exported` once that loads plain folders too."""
from __future__ import annotations

from pathlib import Path


def load_pipeline(folder: str | Path):
    """(pipeline, recipe) of an exported student or of a plain diffusers pipeline folder (recipe {})."""
    from diffusers import DiffusionPipeline

    from stepdistill.pipelines import RECIPE_FILE, load_exported

    folder = Path(folder)
    if (folder / RECIPE_FILE).is_file():
        pipe, recipe = load_exported(folder)
    elif (folder / "model_index.json").is_file():
        pipe, recipe = DiffusionPipeline.from_pretrained(str(folder)), {}
    else:
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    pipe.set_progress_bar_config(disable=True)
    return pipe, recipe
