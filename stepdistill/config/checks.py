"""Checks of a teacher source that need no model: the folder exists and is a diffusers pipeline, custom code is
allowed, a hub id is cached when offline."""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from stepdistill.config.schema import ConfigError, TeacherConfig

TRUSTED_LIBRARIES = {"diffusers", "transformers", None}


def check_teacher_source(cfg: TeacherConfig) -> None:
    """Fail fast on a teacher that cannot load: no path, a missing folder, a folder that is not a diffusers
    pipeline (or, for kind mlp, not an exported MLP student), custom code without trust_remote_code, or a hub id
    that is not cached while offline."""
    if cfg.kind == "gmm":
        if cfg.path:
            raise ConfigError("teacher.path is set but teacher.kind is gmm: set teacher.kind to "
                              "sd/sdxl/pixart/sd3/auto (a pipeline) or mlp (an exported MLP student), or clear "
                              "teacher.path")
        return
    if cfg.kind == "mlp":
        if not (Path(cfg.path).expanduser() / "student.json").is_file():
            raise ConfigError(f"teacher.path {cfg.path or '(empty)'} is not an exported MLP student (no student.json) "
                              "for teacher.kind=mlp: give the final/ folder of a run on the analytic teacher, e.g. "
                              "${stages.NAME.final} in a recipe")
        return
    if not cfg.path:
        raise ConfigError(f"teacher.path is empty for teacher.kind={cfg.kind}: give a local diffusers pipeline "
                          "folder or a hub id such as stabilityai/sd-turbo")
    path = Path(cfg.path).expanduser()
    if path.exists():
        check_pipeline_folder(path, cfg.trust_remote_code)
        return
    if not _is_hub_id(cfg.path):
        raise ConfigError(f"teacher.path {cfg.path}: model folder does not exist; check the path, or give a hub id "
                          "such as stabilityai/sd-turbo")
    offline = cfg.local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.path, "model_index.json", revision=cfg.revision or None)
        if not isinstance(cached, str):
            raise ConfigError(f"teacher.path {cfg.path} is a hub id but the hub is offline (HF_HUB_OFFLINE=1 or "
                              "teacher.local_files_only=true) and it is not in the local cache: run "
                              f"`hf download {cfg.path}` where there is internet, or point teacher.path "
                              "at a local pipeline folder")


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith(("~", "."))


def _trusted_library(name: str | None) -> bool:
    """diffusers, transformers, or a diffusers pipeline module (old SD folders name "stable_diffusion")."""
    if name in TRUSTED_LIBRARIES:
        return True
    spec = importlib.util.find_spec("diffusers")  # locates diffusers without importing it
    return bool(spec and spec.origin and re.fullmatch(r"\w+", name)
                and (Path(spec.origin).parent / "pipelines" / name).is_dir())


def check_pipeline_folder(path: Path, trust_remote_code: bool = False, what: str = "teacher.path") -> None:
    """Refuse a folder that diffusers could not load as a pipeline (no or broken model_index.json, missing
    component folders) or that needs custom code without trust_remote_code; `what` names the input."""
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise ConfigError(f"{what} {path} is not a diffusers pipeline folder (no model_index.json): give the "
                          "folder that save_pretrained wrote, or a hub id")
    try:
        spec = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: {index} is not valid JSON ({e}); re-download the pipeline") from e
    if not isinstance(spec, dict):
        raise ConfigError(f"{what} {path}: {index} holds a {type(spec).__name__}, not the mapping of "
                          "components that save_pretrained writes; re-download the pipeline")
    custom = sorted(name for name, value in spec.items() if isinstance(value, list) and len(value) == 2
                    and not _trusted_library(value[0]))
    custom += sorted(str(p.relative_to(path)) for p in path.rglob("*.py"))
    if custom and not trust_remote_code:
        raise ConfigError(f"{what} {path} needs custom code ({', '.join(custom)}), which runs arbitrary Python; "
                          "read it, then set teacher.trust_remote_code=true to allow it")
    components = {name: value for name, value in spec.items() if not name.startswith("_") and isinstance(value, list)
                  and len(value) == 2 and value[0] is not None and value[1] is not None}
    missing = sorted(name for name in components if not (path / name).is_dir())
    if missing:
        raise ConfigError(f"{what} {path}: the component folders {', '.join(missing)} that {index.name} lists "
                          "are missing; give the complete folder that save_pretrained wrote, or re-download it")
