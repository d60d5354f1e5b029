"""Loading what stepdistill exports: `load_exported` is the one loader of students (and of plain diffusers pipeline
folders, such as a teacher), used by evaluation, the demo and the COCO protocol."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from stepdistill.export.diffusers_student import RECIPE_FILE

# product name -> loader(folder, recipe, **from_pretrained_kwargs) -> pipeline; objectives with their own export
# product (a routed pipeline, a custom pipeline class) register theirs
PRODUCT_LOADERS: dict[str, Callable] = {}


def register_product_loader(product: str, loader: Callable) -> None:
    PRODUCT_LOADERS[product] = loader


def _diffusers(folder: Path, recipe: dict, **kwargs):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder), **kwargs)


def _routed(folder: Path, recipe: dict, **kwargs):
    from stepdistill.pipelines.routed import RoutedPipeline

    return RoutedPipeline.from_pretrained(folder, **kwargs)


register_product_loader("diffusers", _diffusers)
register_product_loader("routed", _routed)


def load_exported(folder: str | Path, **from_pretrained_kwargs):
    """(pipeline, recipe) of an exported student: sample with `pipe(prompt, **recipe["pipeline_kwargs"])`. A plain
    diffusers pipeline folder (no stepdistill.json) loads with an empty recipe."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give an exported student (final/) or a diffusers "
                                "pipeline folder")
    if not (folder / RECIPE_FILE).is_file():
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder} is neither a student exported by stepdistill (no {RECIPE_FILE}) nor "
                                    "a diffusers pipeline folder (no model_index.json)")
        return _diffusers(folder, {}, **from_pretrained_kwargs), {}
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    product = recipe.get("product", "diffusers")
    if product not in PRODUCT_LOADERS:
        raise ValueError(f"{folder} holds a {product!r} export; known products: {sorted(PRODUCT_LOADERS)} (import "
                         "the objective that writes it)")
    return PRODUCT_LOADERS[product](folder, recipe, **from_pretrained_kwargs), recipe


SCHEDULE_KWARGS = ("timesteps", "sigmas")  # an explicit sampling grid: it sets the step count by its length


def sampling_kwargs(recipe: dict, steps: int | None = None) -> dict:
    """An export recipe's pipeline arguments other than steps and CFG (timesteps, eta, ...). With `steps` and an
    explicit grid (a few-step student's times), the grid's first `steps` entries: the student's `steps`-step
    sampler, as `stepdistill sample` runs it; a pipeline would otherwise follow the grid and ignore the count."""
    kwargs = {k: v for k, v in recipe.get("pipeline_kwargs", {}).items()
              if k not in ("guidance_scale", "num_inference_steps")}
    for key in SCHEDULE_KWARGS:
        if steps is not None and key in kwargs:
            if steps > len(kwargs[key]):
                raise ValueError(f"the export samples at {key} {kwargs[key]} ({len(kwargs[key])} steps at most); "
                                 f"ask for {len(kwargs[key])} steps or fewer")
            kwargs[key] = kwargs[key][:steps]
    return kwargs


__all__ = ["RECIPE_FILE", "load_exported", "register_product_loader", "sampling_kwargs"]
