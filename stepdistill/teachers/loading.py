"""Which adapter a diffusers pipeline gets, and a teacher loaded from a TeacherConfig: the one module that knows
every diffusers teacher kind (flux.py, wan.py and upscale.py build on diffusers_teacher.py, so the dispatch lives above both)."""
from __future__ import annotations

import torch

from stepdistill.teachers.diffusers_teacher import (
    TEACHERS,
    DiffusersTeacher,
    detect_kind,
    load_pipeline,
    resolve_dtype,
)
from stepdistill.teachers.flux import FluxTeacher
from stepdistill.teachers.upscale import SDUpscaleTeacher
from stepdistill.teachers.wan import WanI2VTeacher, WanTeacher

# adapters built on DiffusersTeacher in modules of their own
OWN_MODULE = {"flux": FluxTeacher, "wan": WanTeacher, "wan_i2v": WanI2VTeacher, "sd_upscale": SDUpscaleTeacher}


def teacher_class(kind: str) -> type[DiffusersTeacher]:
    """The adapter of a pipeline kind (detect_kind)."""
    return OWN_MODULE.get(kind) or TEACHERS[kind]


def load_diffusers_teacher(cfg, device: torch.device | str = "cpu") -> DiffusersTeacher:
    """The teacher a TeacherConfig (kind sd|sdxl|pixart|sd3|flux|wan|wan_i2v|sd_upscale|auto) describes, loaded onto `device`."""
    device = torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg.path, cfg.local_files_only, cfg.revision, cfg.variant, dtype, cfg.trust_remote_code)
    kind = detect_kind(pipe)
    if cfg.kind not in ("auto", kind):
        raise ValueError(f"teacher.kind is {cfg.kind!r} but {cfg.path} holds a {kind} pipeline "
                         f"({type(pipe).__name__}): set teacher.kind={kind} or teacher.kind=auto")
    pipe.to(device)
    identity = ":".join(x for x in (kind, cfg.path, cfg.revision, cfg.variant, str(dtype).split(".")[-1]) if x)
    return teacher_class(kind)(pipe, identity, device)
