"""Typed configuration: the schema (torch-free dataclasses), loading from YAML files and presets with dotted
overrides, and checks of the teacher source that need no model."""
from stepdistill.config.checks import check_pipeline_folder, check_teacher_source
from stepdistill.config.loading import (
    PRESETS,
    build_dataclass,
    config_from_dict,
    config_to_dict,
    load_config,
    load_config_tree,
    parse_overrides,
    parse_set,
    preset_names,
    read_config_tree,
    resolve_config_path,
)
from stepdistill.config.preflight import (
    check_before_import,
    check_mixed_precision,
    check_output_dir,
    resolve_report_to,
)
from stepdistill.config.schema import (
    UNET_LORA_TARGETS,
    Config,
    ConfigError,
    DataConfig,
    PairsConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = ["PRESETS", "UNET_LORA_TARGETS", "Config", "ConfigError", "DataConfig", "PairsConfig", "StudentConfig",
           "TeacherConfig", "TrainConfig", "build_dataclass", "check_before_import", "check_mixed_precision",
           "check_output_dir", "check_pipeline_folder", "check_teacher_source", "config_from_dict",
           "config_to_dict", "load_config", "load_config_tree", "parse_overrides", "parse_set", "preset_names",
           "read_config_tree", "resolve_config_path", "resolve_report_to"]
