"""Typed configuration: dataclasses loaded from YAML, with dotted command-line overrides.

Unknown keys, wrong types and values outside a field's CHOICES fail before any work, naming the key, the
expected type and the valid choices (with a "did you mean" for typos)."""
from __future__ import annotations

import dataclasses
import difflib
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

    CHOICES = {"kind": ("gmm", "sd", "sdxl", "pixart", "sd3", "auto"), "dtype": ("auto", "fp32", "bf16", "fp16"),
               "schedule": ("vp", "flow")}


@dataclass
class DataConfig:
    prompts_file: str = ""  # one prompt per line (text teachers); empty: a small built-in list
    num_workers: int = 0


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

    CHOICES = {"mixed_precision": ("auto", "no", "bf16", "fp16"), "report_to": ("tensorboard", "wandb", "none"),
               "nonfinite": ("stop", "skip"),
               "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine")}


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
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


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
