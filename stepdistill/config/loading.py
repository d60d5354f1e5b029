"""Loading configs: YAML files or shipped presets, dotted overrides, and validation of every key against the schema
(unknown keys, wrong types and values outside a field's choices or range fail before any work, naming the key, the
expected type and the valid choices, with a "did you mean" for typos)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from stepdistill.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    did_you_mean,
)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats and lists for tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, "
                              f"got {value!r}")
        return build_dataclass(tp, value, key + ".")
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
    if tp is str and isinstance(value, str):
        return resolve_asset(value, key)
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
NAME_RANGES = {"lr": ">0", "weight_decay": ">=0", "max_grad_norm": ">0"}
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


def _yaml_word(value: Any, options: tuple) -> Any:
    """YAML 1.1 reads no/off/false as False (yes/on/true as True): for a choice of words that holds "no" ("yes"),
    that is the word the user wrote."""
    if isinstance(value, bool) and ("yes" if value else "no") in options:
        return "yes" if value else "no"
    return value


def build_dataclass(cls: type, data: dict | None, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, refusing unknown keys, wrong types and invalid choices."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    choices = getattr(cls, "CHOICES", {})
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key}.{did_you_mean(key, fields, prefix)} Valid keys: "
                              f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(_yaml_word(value, choices.get(name, ())), hints[name], prefix + name)
    obj = cls(**kwargs)
    for name, options in choices.items():
        if getattr(obj, name) not in options:
            raise ConfigError(f"{prefix}{name}: {getattr(obj, name)!r} is not one of {list(options)}."
                              f"{did_you_mean(getattr(obj, name), options)}")
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name} must be a finite number, got {value!r}: e.g. "
                              f"{prefix}{f.name}={f.default!r}")
        spec = _range_spec(cls, f.name)
        problem = spec and _range_error(getattr(obj, f.name), spec)
        if problem:
            raise ConfigError(f"{prefix}{f.name} {problem}, got {getattr(obj, f.name)!r}: set a value in range, "
                              f"e.g. {prefix}{f.name}={f.default!r}")
    return obj


PRESETS = Path(__file__).parent.parent / "presets"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
ASSET_PREFIX = "asset:"


def resolve_asset(value: str, key: str) -> str:
    """`asset:NAME` as the absolute path of NAME in the package's assets (`asset:digits_teacher`,
    `asset:configs/digits_prompts.txt`), so the shipped presets run from any working folder of an installed package;
    any other value is returned as it is (a relative path stays relative to the working folder)."""
    if not value.startswith(ASSET_PREFIX):
        return value
    name = Path(value[len(ASSET_PREFIX):])
    path = ASSETS / name
    if name.is_absolute() or ".." in name.parts or not name.parts or not path.exists():
        shipped = sorted(str(p.relative_to(ASSETS)) for p in [*ASSETS.iterdir(), *(ASSETS / "configs").iterdir()]
                         if p.name != "configs")
        choices = ", ".join(ASSET_PREFIX + s for s in shipped)
        raise ConfigError(f"{key}: {value} names no shipped asset; give one of {choices}, or a path")
    return str(path)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def resolve_config_path(name: str | Path) -> Path:
    """A config file: a path, or the name of a shipped preset (`dmd2_sd15` or `dmd2_sd15.yaml`)."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"config {p} is a directory: give a YAML file or a preset name ({', '.join(preset_names())})")
    preset = PRESETS / (p.name if p.suffix == ".yaml" else p.name + ".yaml")
    if preset.is_file() and (len(p.parts) == 1 or p.parent.name == "configs"):
        return preset
    raise ConfigError(f"config file {name} does not exist and is not a preset name.{did_you_mean(p.stem, preset_names())} "
                      f"Presets: {', '.join(preset_names())}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loading that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice; keep one")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_config_tree(name: str | Path) -> dict:
    """The mapping a config file (or preset name) holds, with errors that name the file and the line."""
    p = resolve_config_path(name)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not a text file ({e.reason}): give a YAML file") from e
    if "\x00" in text:
        raise ConfigError(f"config file {p} is a binary file: give a YAML file")
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"config file {p}, {e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if tree is None:  # without this, an empty file would silently train the schema's defaults
        raise ConfigError(f"config file {p} is empty (no settings): give a config, e.g. a copy of a preset "
                          f"({', '.join(preset_names()[:3])}, ...), or leave --config out for the schema's defaults")
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(tree).__name__}")
    return tree


SECTIONS = {"objective": "name", "teacher": "path", "student": "kind", "data": "prompts_file", "train": "max_steps"}


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    if len(parts) == 1 and dotted in SECTIONS and not isinstance(value, dict):
        raise ConfigError(f"override {dotted}={value!r}: {dotted} is a section, not a value: set one of its keys, "
                          f"e.g. {dotted}.{SECTIONS[dotted]}=...")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is {node!r} in the config, not a section of keys; set "
                              f"{part} to a mapping there")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); quote "
                              "it, e.g. key='value'") from e
        out.append((key.strip(), value))
    return out


def parse_set(mapping: dict, where: str) -> list[tuple[str, Any]]:
    """Dotted overrides given as a mapping ({"train.max_steps": 10} or nested {"train": {"max_steps": 10}})."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where} must be a mapping of dotted keys to values, e.g. {{train.max_steps: 100}}")
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, dict) and "." not in str(key) and key in ("objective", "teacher", "student", "data",
                                                                         "train"):
            out += [(f"{key}.{k}", v) for k, v in parse_set(value, f"{where}.{key}")]
        else:
            out.append((str(key), value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config or preset (or start from defaults), apply dotted overrides, validate everything."""
    return config_from_dict(load_config_tree(path, overrides))


def load_config_tree(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """The config tree of a file or preset with dotted overrides applied, not yet validated."""
    tree = read_config_tree(path) if path is not None else {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return tree


def plain_sections(tree: dict) -> dict:
    """The validated sections that need no objective class (teacher, student, data, train), after checking the
    tree's shape: their mistakes are found without importing the objectives (and torch)."""
    sections = {f.name for f in dataclasses.fields(Config)}
    for key in tree:
        if key not in sections:
            close = difflib.get_close_matches(key, sections, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config section {key!r}.{hint} Valid sections: {', '.join(sorted(sections))}")
    for section in ("objective", "teacher", "student", "data", "train"):
        if tree.get(section) is not None and not isinstance(tree[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping of keys, got "
                              f"{type(tree[section]).__name__}")
    if not isinstance(tree.get("recipe") or [], list):
        raise ConfigError("recipe must be a list of stages, e.g. [{name: stage1, set: {...}}]")
    return {name: build_dataclass(cls, tree.get(name), name + ".") for name, cls in
            (("teacher", TeacherConfig), ("student", StudentConfig), ("data", DataConfig), ("train", TrainConfig))}


def config_from_dict(tree: dict, where: str = "") -> Config:
    """A validated Config; `where` prefixes every error (e.g. the recipe stage)."""
    try:
        sections = plain_sections(tree)
        from stepdistill.objectives import objective_class

        objective = dict(tree.get("objective") or {})
        name = objective.setdefault("name", "regression")
        return Config(objective=build_dataclass(objective_class(name).config_class, objective, "objective."),
                      recipe=tree.get("recipe") or [], **sections)
    except ConfigError as e:
        if where:
            raise ConfigError(f"{where}{e}") from e
        raise


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


