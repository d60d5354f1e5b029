"""`stepdistill sample`: images from an exported student (or any diffusers pipeline folder) from the shell. Each
image is a PNG named by its prompt and seed, written as soon as its batch is sampled (a progress bar counts them),
`grid.png` shows them labelled (a row per prompt, a column per seed, the first GRID_SEEDS seeds), and
`samples.json` records the exact pipeline call. A video pipeline's clips are a GIF each (Pillow), an MP4 where
imageio-ffmpeg is installed (`pip install stepdistill[video]`) and a PNG of their frames side by side, which the
grid shows. A student of the analytic teacher gives its points (CSV) and a
scatter beside the teacher's own samples."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tqdm import tqdm

from stepdistill.config import ConfigError, check_pipeline_folder, config_from_dict
from stepdistill.config.preflight import check_pipeline_weights

IMAGES_PER_PROMPT = 4
POINTS = 1024
BATCH = 16  # images per pipeline call
GRID_SEEDS = 8  # columns of grid.png
FPS = 8  # frames per second of written clips
RUN_CONFIG = "training_config.json"  # the config of the run an export came from (see training.restore)


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"


def sample(export: str | Path, prompts: list[str], num: int | None, seed: int, out: Path, steps: int | None = None,
           guidance: float | None = None, image: str | Path | None = None) -> dict:
    folder = Path(export)
    if not folder.is_dir():
        raise ConfigError(f"sample: {folder} is not a folder: give an exported student (e.g. runs/NAME/final) or a "
                          "diffusers pipeline folder")
    from stepdistill.export.mlp import STUDENT_JSON

    if (folder / STUDENT_JSON).is_file():  # an MLP student of the analytic teacher
        return sample_points(folder, prompts, num or POINTS, seed, out)
    return sample_images(folder, prompts, num or IMAGES_PER_PROMPT, seed, out, steps, guidance, image)


def _pipeline_call(recipe: dict, steps: int | None, guidance: float | None) -> dict:
    """The pipeline arguments: the export's recipe, with --steps / --guidance where they apply."""
    kwargs = dict(recipe.get("pipeline_kwargs") or {})
    sampling = recipe.get("sampling") or {}
    if steps is not None:
        if recipe and not sampling.get("any_num_steps"):
            raise ConfigError(f"--steps: this student was trained to sample in {recipe.get('num_inference_steps')} "
                              f"step(s) at timesteps {recipe.get('student_timesteps')}; leave --steps out")
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    return kwargs


def sample_images(folder: Path, prompts: list[str], num: int, seed: int, out: Path, steps: int | None,
                  guidance: float | None, image: str | Path | None = None) -> dict:
    import torch

    from stepdistill.export import RECIPE_FILE
    from stepdistill.pipelines import load_exported
    from stepdistill.visualize import labelled_grid

    if not prompts:
        raise ConfigError(f"sample: {folder} is a text-to-image pipeline: give at least one prompt, e.g. "
                          f"stepdistill sample {folder} \"a photo of a cat\"")
    recipe = json.loads((folder / RECIPE_FILE).read_text()) if (folder / RECIPE_FILE).is_file() else {}
    call = _pipeline_call(recipe, steps, guidance)  # refused arguments fail before the pipeline loads
    first_frame = _conditioning_image(folder, recipe, image)
    if not recipe:
        check_pipeline_folder(folder, what="sample:")
    check_pipeline_weights(folder, "sample:")
    pipe, _ = load_exported(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # one bar over all images below, not one per call
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(seed, seed + num))
    rows, files = [], []
    with tqdm(total=len(prompts) * num, desc="stepdistill sample", unit="image", file=sys.stderr) as bar:
        for i, prompt in enumerate(prompts):
            rows.append([])
            for start in range(0, num, BATCH):
                batch = seeds[start:start + BATCH]
                generators = [torch.Generator().manual_seed(s) for s in batch]  # CPU noise: same images anywhere
                inputs = first_frame
                if first_frame and "Upscale" in str(recipe.get("pipeline_class")):  # one image per prompt
                    inputs = {"image": [first_frame["image"]] * len(batch)}
                result = pipe(prompt=[prompt] * len(batch), generator=generators, output_type="pil", **call,
                              **inputs)
                clips = getattr(result, "frames", None)
                images = []
                for j, s in enumerate(batch):
                    stem = out / f"{i:02d}-{_slug(prompt)}-seed{s}"
                    if clips is None:
                        images.append(result.images[j])
                        images[-1].save(stem.with_suffix(".png"))
                        files.append(str(stem.with_suffix(".png")))
                    else:
                        strip, written = write_clip(clips[j], stem)
                        images.append(strip)
                        files += written
                if len(rows[i]) < GRID_SEEDS:
                    rows[i] += images[:GRID_SEEDS - len(rows[i])]
                bar.update(len(batch))
    grid = labelled_grid(rows, out / "grid.png", row_labels=prompts,
                         column_labels=[f"seed {s}" for s in seeds[:GRID_SEEDS]])
    record = {"export": str(folder), "prompts": prompts, "seeds": seeds, "call": call, "device": device,
              **({"image": str(image)} if image else {}),
              "files": files, "grid": str(grid)}
    (out / "samples.json").write_text(json.dumps(record, indent=2))
    return {"out": str(out), "images": len(files), "grid": str(grid), "call": call}


def _conditioning_image(folder: Path, recipe: dict, image: str | Path | None) -> dict:
    """{"image": the picture} for an image-to-video or upscaler pipeline, which needs one; refused for others."""
    from PIL import Image

    needs_image = any(k in str(recipe.get("pipeline_class", "")) for k in ("ImageToVideo", "Upscale"))
    if image is None:
        if needs_image:
            raise ConfigError(f"sample: {folder} is an image-conditioned pipeline ({recipe['pipeline_class']}): give "
                              "its input image (an image-to-video pipeline's first frame, an upscaler's "
                              "low-resolution picture), e.g. --image frame.png")
        return {}
    if recipe and not needs_image:
        raise ConfigError(f"sample --image: {folder} is a {recipe.get('pipeline_class')}, which takes no image; "
                          "leave out --image")
    if not Path(image).is_file():
        raise ConfigError(f"sample --image {image}: no such file")
    with Image.open(image) as picture:
        return {"image": picture.convert("RGB")}


def write_clip(frames: list, stem: Path) -> tuple:
    """One clip (PIL frames) as stem.gif, stem.mp4 (with imageio-ffmpeg) and stem.png (its frames side by side);
    returns (the PNG's image, the files written)."""
    from diffusers.utils import export_to_gif, export_to_video, make_image_grid

    files = [export_to_gif(frames, str(stem.with_suffix(".gif")), fps=FPS)]
    try:
        import imageio_ffmpeg  # noqa: F401  (export_to_video's writer; without it, diffusers falls back to OpenCV)
    except ImportError:
        pass
    else:
        files.append(export_to_video(frames, str(stem.with_suffix(".mp4")), fps=FPS))
    strip = make_image_grid(list(frames), rows=1, cols=len(frames))
    strip.save(stem.with_suffix(".png"))
    return strip, [*files, str(stem.with_suffix(".png"))]


def sample_points(folder: Path, prompts: list[str], num: int, seed: int, out: Path) -> dict:
    """A student of the analytic teacher: `num` points (classes cycled, or the given class indices) and a scatter
    beside the teacher's samples."""
    import torch

    from stepdistill.export import load_mlp_student
    from stepdistill.teachers import load_teacher
    from stepdistill.visualize import scatter_panels

    config = next((p for p in (folder / RUN_CONFIG, folder.parent / "config.json") if p.is_file()), None)
    if config is None:
        raise ConfigError(f"sample: {folder} is a student of the analytic teacher but neither {folder / RUN_CONFIG} "
                          f"nor {folder.parent / 'config.json'} says which teacher: export it with "
                          "stepdistill export")
    teacher = load_teacher(config_from_dict(json.loads(config.read_text())).teacher)
    generator = load_mlp_student(folder, teacher).eval()
    classes = teacher.num_classes
    if prompts and not classes:
        raise ConfigError(f"sample: {folder} is an unconditional student: give no prompts")
    try:
        labels = [int(p) for p in prompts]
    except ValueError as e:
        raise ConfigError(f"sample: this student's conditions are class indices 0..{classes - 1}, got "
                          f"{prompts}") from e
    if any(not 0 <= c < classes for c in labels):
        raise ConfigError(f"sample: class indices must lie in 0..{classes - 1}, got {labels}")
    g = torch.Generator().manual_seed(seed)
    pool = labels or list(range(classes)) or [0]
    index = torch.tensor(pool)[torch.arange(num) % len(pool)]
    noise = torch.randn((num, *teacher.sample_shape), generator=g)
    x0 = generator.sample(noise, teacher.encode(index))
    reference = teacher.mixture.sample(num, index if classes else None, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    points = out / "points.csv"
    points.write_text("x,y,class\n" + "".join(f"{x:.6g},{y:.6g},{int(c)}\n"
                                              for (x, y), c in zip(x0[:, :2].tolist(), index.tolist())))
    plot = scatter_panels([("teacher", reference), ("student", x0)], out / "scatter.png")
    return {"out": str(out), "points": str(points), "scatter": str(plot), "num": num}
