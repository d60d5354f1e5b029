"""Zero-shot COCO presets: COCO-2014 30K FID (GigaGAN / DMD2 protocol: one caption per val2014 image, generation
at the model's resolution, center crop + Lanczos resize to 256, FID against val2014 with clean-fid) and the
COCO-2017 5K CLIP-score preset. Captions file, reference folder, N and resolution are the user's to set."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stepdistill.evaluation.clip import DEFAULT_CLIP, clip_score
from stepdistill.evaluation.fid import FIDProtocol, compute_fid, reference_statistics
from stepdistill.pipelines import sampling_kwargs


@dataclass
class CocoPreset:
    name: str
    num_samples: int
    eval_resolution: int  # images are center-cropped and Lanczos-resized to this side before FID
    fid: bool
    clip: bool
    seed: int = 0
    steps: int = 0  # 0: the pipeline's recipe (exported students) or 50
    guidance_scale: float = -1.0  # < 0: the recipe's (students) or 7.5
    batch_size: int = 16


PRESETS = {
    "coco2014-30k": CocoPreset("coco2014-30k", 30000, 256, fid=True, clip=False),
    "coco2017-5k": CocoPreset("coco2017-5k", 5000, 256, fid=False, clip=True),
}


def get_preset(name: str, **overrides) -> CocoPreset:
    if name not in PRESETS:
        raise ValueError(f"COCO preset {name!r} is not one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def read_captions(path: str | Path) -> list[str]:
    """Captions from a COCO annotation file (captions_val2014.json: the first caption, by annotation id, of each
    image, images in id order) or from a text file with one caption per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist (e.g. annotations/captions_val2014.json)")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        first: dict[int, tuple[int, str]] = {}
        for ann in data["annotations"]:
            if ann["image_id"] not in first or ann["id"] < first[ann["image_id"]][0]:
                first[ann["image_id"]] = (ann["id"], ann["caption"].strip())
        return [first[i][1] for i in sorted(first)]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def select_prompts(captions: list[str], n: int, seed: int) -> list[str]:
    """n captions drawn without replacement with random.Random(seed) (all of them, in order, if n >= len)."""
    if n >= len(captions):
        return list(captions)
    return [captions[i] for i in sorted(random.Random(seed).sample(range(len(captions)), n))]


def center_crop_resize(array: np.ndarray, size: int) -> np.ndarray:
    """Center-crop the long side, Lanczos-resize to size x size (HWC uint8 in and out)."""
    h, w = array.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = Image.fromarray(array[top:top + side, left:left + side])
    return np.asarray(img.resize((size, size), Image.LANCZOS))


@torch.no_grad()
def generate(pipe, prompts: list[str], folder: Path, preset: CocoPreset, steps: int, guidance: float,
             pipeline_kwargs: dict, progress=None) -> tuple[torch.Tensor, list[int]]:
    """Images of `prompts` (image i from seed preset.seed + i) saved at the eval resolution; returns them in
    [0, 1] and the generated (model) resolution."""
    folder.mkdir(parents=True, exist_ok=True)
    out, size = [], []
    for start in range(0, len(prompts), preset.batch_size):
        chunk = prompts[start:start + preset.batch_size]
        generators = [torch.Generator().manual_seed(preset.seed + start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="np", **pipeline_kwargs).images
        size = list(images.shape[1:3])
        for i, image in enumerate(images):
            array = center_crop_resize((np.clip(image, 0, 1) * 255).round().astype(np.uint8), preset.eval_resolution)
            Image.fromarray(array).save(folder / f"{start + i:06d}.png")
            out.append(torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255)
        if progress is not None:
            progress.update(len(chunk))
    return torch.stack(out), size


def run_coco_eval(pipe, preset: CocoPreset, captions_file: str | Path, out_dir: str | Path,
                  reference_dir: str | Path | None = None, clip_model: str = DEFAULT_CLIP,
                  fid_protocol: FIDProtocol | None = None, recipe: dict | None = None,
                  cache_dir: str | Path | None = None,
                  pipeline_path: str = "", feature_module: torch.nn.Module | None = None) -> dict:
    """Generate the preset's images, compute its metrics, write `<out_dir>/metrics.json` and return it. FID runs
    on `feature_module` when given, else on the backend's Inception."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if preset.fid and not reference_dir:
        raise ValueError(f"preset {preset.name} computes FID: give the reference image folder (e.g. val2014)")
    recipe = recipe or {}
    steps = preset.steps or recipe.get("num_inference_steps", 50)
    guidance = preset.guidance_scale if preset.guidance_scale >= 0 else recipe.get("guidance_scale", 7.5)
    pipeline_kwargs = sampling_kwargs(recipe, preset.steps)
    prompts = select_prompts(read_captions(captions_file), preset.num_samples, preset.seed)
    fid_protocol = fid_protocol or FIDProtocol()
    pipe.set_progress_bar_config(disable=True)
    with tqdm(total=len(prompts), desc=f"{preset.name}: generating", unit="img") as bar:
        images, generated_size = generate(pipe, prompts, out_dir / "images", preset, steps, guidance,
                                          pipeline_kwargs, bar)
    (out_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
    result: dict = {
        "preset": asdict(preset), "pipeline": pipeline_path, "captions_file": str(captions_file),
        "prompt_selection": "first caption (lowest annotation id) of each image in image-id order; "
                            f"{len(prompts)} drawn with random.Random({preset.seed}).sample, kept in that order",
        "prompt_set_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "num_samples": len(prompts), "seed": preset.seed, "seeds": f"image i uses torch.Generator().manual_seed"
                                                                     f"({preset.seed} + i)",
        "steps": steps, "guidance_scale": guidance, "generation_resolution": generated_size,
        "eval_resolution": preset.eval_resolution, "eval_transform": "center crop + PIL Lanczos resize",
    }
    if preset.fid:
        size = preset.eval_resolution
        ref = reference_statistics(reference_dir, fid_protocol, feature_module, cache_dir=cache_dir or out_dir,
                                   transform=lambda a: center_crop_resize(a, size), transform_name=f"ccrop{size}")
        result["fid"] = {"value": compute_fid(out_dir / "images", ref, fid_protocol, feature_module),
                         **asdict(fid_protocol),
                         "reference_dir": str(reference_dir),
                         "library": "clean-fid" if fid_protocol.backend == "cleanfid" else "torchmetrics"}
    if preset.clip:
        result["clip_score"] = {"value": clip_score(images, prompts, clip_model), "model": clip_model,
                                "library": "torchmetrics CLIPScore (100 * max(cos, 0))"}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
