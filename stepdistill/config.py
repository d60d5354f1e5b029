"""Typed configuration: dataclasses loaded from YAML, with dotted command-line overrides.

Unknown keys, wrong types and values outside a field's CHOICES fail before any work, naming the key, the
expected type and the valid choices (with a "did you mean" for typos)."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stepdistill.students import StudentConfig


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key and the fix."""


@dataclass
class TeacherConfig:
    kind: str = "gmm"  # gmm | sd | sdxl | pixart | sd3 | auto (detect from the pipeline folder)
    path: str = ""  # hub id or local diffusers pipeline folder (not for gmm)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    local_files_only: bool = False
    revision: str = ""
    variant: str = ""
    # analytic teacher (kind: gmm)
    num_modes: int = 8
    radius: float = 1.0
    std: float = 0.1
    num_classes: int = 0
    own_weight: float = 0.25
    schedule: str = "vp"  # vp (SD's scaled_linear, eps) | flow (SD3-style, shift below)
    flow_shift: float = 1.0
    backbone_hidden: int = 256
    backbone_depth: int = 4
    trust_remote_code: bool = False  # allow a pipeline folder whose components need custom Python code
    # frozen backbone's weights in CPU memory, streamed to the accelerator per forward (accelerate's cpu_offload);
    # only for a separate teacher copy (not DMD2's critic_shared_base or consistency's teacher_net=lora_base)
    offload: bool = False

    CHOICES = {"kind": ("gmm", "sd", "sdxl", "pixart", "sd3", "auto"), "dtype": ("auto", "fp32", "bf16", "fp16"),
               "schedule": ("vp", "flow")}
    RANGES = {"num_modes": ">=1", "radius": ">0", "std": ">0", "num_classes": ">=0", "flow_shift": ">0",
              "backbone_hidden": ">=1", "backbone_depth": ">=1"}


@dataclass
class DataConfig:
    prompts_file: str = ""  # one prompt per line (text teachers); empty: a small built-in list
    num_workers: int = 0
    image_dir: str = ""  # a folder of real images (e.g. a GAN real branch); checked before training
    resolution: int = 0  # image side in pixels the student produces; 0: the teacher's default
    bad_images: str = "refuse"  # refuse | skip: what unreadable or mis-sized files in image_dir do

    CHOICES = {"bad_images": ("refuse", "skip")}
    RANGES = {"num_workers": ">=0", "resolution": ">=0"}


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 64
    seed: int = 0
    mixed_precision: str = "auto"  # auto (bf16 on GPU) | no | bf16 | fp16
    gradient_checkpointing: bool = False
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    ema_decay: float = 0.0  # 0 disables the generator EMA
    checkpoint_every: int = 500
    checkpoints_limit: int = 2
    resume: str = ""  # "" | latest | path of a checkpoint folder
    overwrite: bool = False  # allow reusing an output_dir that holds a different run
    log_every: int = 50
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    validate_every: int = 0  # 0: only at the end
    num_validation_samples: int = 16
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    device_threads: int = 0  # torch CPU threads; 0 leaves torch's default
    progress: bool = True
    # speed and memory (issue 7): each is measured by eval/speed.py and counted by eval/plan.py
    optimizer: str = "adamw"  # adamw | adamw_fused (torch's fused kernel) | adamw_8bit (bitsandbytes, 1/4 the state)
    compile: bool = False  # torch.compile the trainable backbones and the teacher's backbone, in place
    channels_last: bool = False  # backbones' conv weights in channels_last memory format (no effect on MLPs)
    attention: str = "sdpa"  # sdpa (diffusers' AttnProcessor2_0) | xformers (pip install -e ".[xformers]")

    CHOICES = {"mixed_precision": ("auto", "no", "bf16", "fp16"), "report_to": ("tensorboard", "wandb", "none"),
               "nonfinite": ("stop", "skip"), "optimizer": ("adamw", "adamw_fused", "adamw_8bit"),
               "attention": ("sdpa", "xformers"),
               "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine")}
    RANGES = {"max_steps": ">=1", "batch_size": ">=1", "lr_warmup_steps": ">=0", "ema_decay": "[0,1)",
              "checkpoint_every": ">=0", "checkpoints_limit": ">=1", "log_every": ">=1", "validate_every": ">=0",
              "num_validation_samples": ">=1", "device_threads": ">=0"}


@dataclass
class Config:
    objective: Any = None  # an ObjectiveConfig subclass chosen by objective.name
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats and lists for tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(args[0]) if args else 'values'}, "
                              f"got {value!r}")
        items = [_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-5 (without a dot) as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        hint = ""
        if tp is str and isinstance(value, bool):
            hint = f" (YAML reads no/yes/off/on as booleans: quote it, e.g. {key}='no')"
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__}){hint}")
    return value


# Ranges by field name for sections that declare none (objective configs): learning rates positive, fractions in
# [0, 1], counts of pairs/steps at least one.
NAME_RANGES = {"lr": ">0", "weight_decay": ">=0", "max_grad_norm": ">0", "num_pairs": ">=1", "teacher_steps": ">=1"}
SUFFIX_RANGES = {"_lr": ">0", "_fraction": "[0,1]", "_ratio": ">0"}


def _range_error(value: Any, spec: str) -> str | None:
    """None if `value` satisfies `spec` (">0", ">=1", "[0,1)", ...), else the rule in words."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if spec.startswith(">="):
        return None if value >= float(spec[2:]) else f"must be >= {spec[2:]}"
    if spec.startswith(">"):
        return None if value > float(spec[1:]) else f"must be > {spec[1:]}"
    low, high = (float(x) for x in spec[1:-1].split(","))
    ok_low = value >= low if spec[0] == "[" else value > low
    ok_high = value <= high if spec[-1] == "]" else value < high
    return None if ok_low and ok_high else f"must lie in {spec}"


def _range_spec(cls: type, name: str) -> str | None:
    ranges = getattr(cls, "RANGES", None)
    if ranges is not None:
        return ranges.get(name)
    if name in NAME_RANGES:
        return NAME_RANGES[name]
    return next((spec for suffix, spec in SUFFIX_RANGES.items() if name.endswith(suffix)), None)


def build_dataclass(cls: type, data: dict | None, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, refusing unknown keys, wrong types and invalid choices."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}.{hint} Valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    obj = cls(**kwargs)
    for name, options in getattr(cls, "CHOICES", {}).items():
        if getattr(obj, name) not in options:
            raise ConfigError(f"{prefix}{name}: {getattr(obj, name)!r} is not one of {list(options)}")
    for f in dataclasses.fields(cls):
        spec = _range_spec(cls, f.name)
        problem = spec and _range_error(getattr(obj, f.name), spec)
        if problem:
            raise ConfigError(f"{prefix}{f.name} {problem}, got {getattr(obj, f.name)!r}: set a value in range, "
                              f"e.g. {prefix}{f.name}={f.default!r}")
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply dotted overrides, validate everything."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (presets live in configs/, e.g. configs/regression_gmm.yaml)")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(tree).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def config_from_dict(tree: dict) -> Config:
    from stepdistill.objectives import REGISTRY

    sections = {f.name for f in dataclasses.fields(Config)}
    for key in tree:
        if key not in sections:
            close = difflib.get_close_matches(key, sections, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config section {key!r}.{hint} Valid sections: {', '.join(sorted(sections))}")
    objective = dict(tree.get("objective") or {})
    name = objective.get("name", "regression")
    if name not in REGISTRY:
        raise ConfigError(f"objective.name: {name!r} is not one of {sorted(REGISTRY)}")
    objective["name"] = name
    for section in ("teacher", "student", "data", "train"):
        if tree.get(section) is not None and not isinstance(tree[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping of keys")
    return Config(
        objective=build_dataclass(REGISTRY[name].config_class, objective, "objective."),
        teacher=build_dataclass(TeacherConfig, tree.get("teacher"), "teacher."),
        student=build_dataclass(StudentConfig, tree.get("student"), "student."),
        data=build_dataclass(DataConfig, tree.get("data"), "data."),
        train=build_dataclass(TrainConfig, tree.get("train"), "train."),
    )


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
TRUSTED_LIBRARIES = {"diffusers", "transformers", None}


OFFLOAD_REFUSALS = {  # (config key, value) -> (why teacher.offload cannot work with it, the other fix)
    ("objective.critic_shared_base", True): ("the teacher's backbone is then the trainable critic's base",
                                             "objective.critic_shared_base=false (a separate frozen teacher)"),
    ("objective.teacher_net", "lora_base"): ("the teacher is then the trainable LoRA student's base",
                                             "objective.teacher_net=teacher (a separate frozen teacher)"),
    ("train.compile", True): ("the offload hooks swap weights in at every forward (torch.compile graph-breaks)",
                              "train.compile=false"),
    ("teacher.kind", "gmm"): ("the analytic teacher has no network weights to offload", None),
}


def teacher_offload_refusal(cfg: Config) -> str | None:
    """Why teacher.offload=true cannot work with this config (the teacher's backbone is not a separate frozen
    network, or the run compiles it), or None; the Trainer refuses with it and the planner skips its rung."""
    sections = {"objective": cfg.objective, "train": cfg.train, "teacher": cfg.teacher}
    for (key, value), (why, fix) in OFFLOAD_REFUSALS.items():
        section, name = key.split(".")
        if getattr(sections[section], name, None) == value:
            fixes = f"{fix} or teacher.offload=false" if fix else "teacher.offload=false"
            return f"teacher.offload=true does not work with {key}={str(value).lower()}: {why}. Set {fixes}"
    return None


def check_teacher_source(cfg: TeacherConfig) -> None:
    """Fail fast on a teacher that cannot load: no path, a missing folder, a folder that is not a diffusers
    pipeline, custom code without trust_remote_code, or a hub id that is not cached while offline."""
    if cfg.kind == "gmm":
        if cfg.path:
            raise ConfigError("teacher.path is set but teacher.kind is gmm: set teacher.kind to "
                              "sd/sdxl/pixart/sd3/auto, or clear teacher.path")
        return
    if not cfg.path:
        raise ConfigError(f"teacher.path is empty for teacher.kind={cfg.kind}: give a local diffusers pipeline "
                          "folder or a hub id such as stabilityai/sd-turbo")
    path = Path(cfg.path).expanduser()
    if path.exists():
        _check_pipeline_folder(path, cfg.trust_remote_code)
        return
    if not HUB_ID.match(cfg.path) or cfg.path.startswith((".", "/", "~")):
        raise ConfigError(f"teacher.path {cfg.path}: model folder does not exist; check the path, or give a hub id "
                          "such as stabilityai/sd-turbo")
    offline = cfg.local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.path, "model_index.json", revision=cfg.revision or None)
        if not isinstance(cached, str):
            raise ConfigError(f"teacher.path {cfg.path} is a hub id but the hub is offline (HF_HUB_OFFLINE=1 or "
                              "teacher.local_files_only=true) and it is not in the local cache: run "
                              f"`huggingface-cli download {cfg.path}` where there is internet, or point teacher.path "
                              "at a local pipeline folder")


def _trusted_library(name: str | None) -> bool:
    """diffusers, transformers, or a diffusers pipeline module (old SD folders name "stable_diffusion")."""
    if name in TRUSTED_LIBRARIES:
        return True
    spec = importlib.util.find_spec("diffusers")  # locates diffusers without importing it
    return bool(spec and spec.origin and re.fullmatch(r"\w+", name)
                and (Path(spec.origin).parent / "pipelines" / name).is_dir())


def _check_pipeline_folder(path: Path, trust_remote_code: bool) -> None:
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise ConfigError(f"teacher.path {path} is not a diffusers pipeline folder (no model_index.json): give the "
                          "folder that save_pretrained wrote, or a hub id")
    try:
        spec = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"teacher.path {path}: model_index.json is not valid JSON ({e}); re-download the "
                          "pipeline") from e
    custom = sorted(name for name, value in spec.items() if isinstance(value, list) and len(value) == 2
                    and not _trusted_library(value[0]))
    custom += sorted(str(p.relative_to(path)) for p in path.rglob("*.py"))
    if custom and not trust_remote_code:
        raise ConfigError(f"teacher.path {path} needs custom code ({', '.join(custom)}), which runs arbitrary Python; "
                          "read it, then set teacher.trust_remote_code=true to allow it")
