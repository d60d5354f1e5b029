"""Export of trained students, and the preview pictures written during training.

Students of diffusers teachers become a diffusers pipeline folder (the teacher does that: it knows its
components); students of the analytic teacher are saved as safetensors weights plus a small JSON."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stepdistill.data import ConditionSource
from stepdistill.mlp import TimeCondMLP
from stepdistill.students import Generator, SegmentGenerator
from stepdistill.teachers.base import Teacher
from stepdistill.visualize import image_grid, scatter_png

STUDENT_JSON = "student.json"
WEIGHTS = "generator.safetensors"


def export_student(generator: Generator, out_dir: str | Path) -> Path:
    """Write the student into `out_dir` atomically (temporary folder, then rename)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    teacher = generator.teacher
    if hasattr(teacher, "export_pipeline"):
        teacher.export_pipeline(generator, tmp)
    else:
        _export_mlp(generator, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _export_mlp(generator: Generator, folder: Path) -> None:
    net = generator.backbone
    if not isinstance(net, TimeCondMLP):
        raise TypeError(f"no exporter for a {type(net).__name__} backbone of a {type(generator.teacher).__name__}")
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(folder / WEIGHTS))
    meta = {"timesteps": generator.timesteps, "prediction_type": generator.prediction_type,
            "sampler": generator.sampler,
            "backbone": {"class": "TimeCondMLP", "data_dim": net.data_dim, "num_classes": net.num_classes,
                         "hidden": net.inp.out_features, "depth": len(net.blocks) + 1, "time_dim": net.time_dim}}
    (folder / STUDENT_JSON).write_text(json.dumps(meta, indent=2))


def load_mlp_student(folder: str | Path, teacher: Teacher) -> Generator:
    """Reload a student exported by `export_student` for the analytic teacher."""
    folder = Path(folder)
    if not (folder / STUDENT_JSON).is_file():
        raise FileNotFoundError(f"{folder} holds no {STUDENT_JSON}: it is not an exported stepdistill student")
    meta = json.loads((folder / STUDENT_JSON).read_text())
    kwargs = {k: v for k, v in meta["backbone"].items() if k != "class"}
    net = TimeCondMLP(**kwargs)
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    cls = SegmentGenerator if meta.get("sampler") == "ddim" else Generator  # MCD students: DDIM segment jumps
    return cls(net, teacher, meta["timesteps"], meta["prediction_type"])


@torch.no_grad()
def save_preview(generator: Generator, source: ConditionSource, n: int, path: str | Path, seed: int = 0) -> Path:
    """Sample n conditions with fixed noise and save a picture: an image grid, or a scatter for 2-D data."""
    teacher = generator.teacher
    device = next(generator.parameters()).device
    g = torch.Generator().manual_seed(seed)
    index = torch.arange(n) % len(source)
    noise = torch.randn((n, *teacher.sample_shape), generator=g).to(device)
    cond = source.encode(index).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        x0 = generator.sample(noise, cond)
    if hasattr(teacher, "decode"):
        return image_grid(teacher.decode(x0), path)
    return scatter_png(x0, path)
