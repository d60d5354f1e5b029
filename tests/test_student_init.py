"""student.init: a student starts from saved weights (a stage-1 export, a model folder or a weights file) instead
of the teacher's, and weights of another architecture are refused."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stepdistill.config import load_config
from stepdistill.objectives import build_objective

ROOT = Path(__file__).resolve().parents[1]


def generator_state(overrides=()):
    cfg = load_config(str(ROOT / "configs/dmd2_gmm.yaml"), ["teacher.backbone_hidden=32", *overrides])
    return build_objective(cfg, "cpu").generator.backbone.state_dict()


def test_student_starts_from_saved_weights_file_or_export_folder(tmp_path):
    start = {k: v + torch.randn_like(v) for k, v in generator_state().items()}  # not the teacher's weights
    save_file(start, str(tmp_path / "weights.safetensors"))
    export = tmp_path / "final"
    export.mkdir()
    save_file(start, str(export / "generator.safetensors"))  # the MLP export's layout
    for init in (tmp_path / "weights.safetensors", export):
        loaded = generator_state([f"student.init={init}"])
        assert all(torch.equal(loaded[k], start[k]) for k in start)
    assert not all(torch.equal(generator_state()[k], start[k]) for k in start)


def test_student_init_refuses_missing_paths_other_architectures_and_lora(tmp_path):
    with pytest.raises(FileNotFoundError, match="student.init"):
        generator_state([f"student.init={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="exported student folder"):
        generator_state([f"student.init={tmp_path}"])
    small = generator_state(["student.kind=smaller", "student.overrides={hidden: 16}"])
    save_file(small, str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        generator_state([f"student.init={tmp_path / 'small.safetensors'}"])
    with pytest.raises(ValueError, match="LoRA weights do not fit"):  # full weights are no adapter
        generator_state(["student.kind=lora", "student.lora_targets=[inp]",
                         f"student.init={tmp_path / 'small.safetensors'}"])


def test_lora_student_starts_from_an_exported_lora_students_adapter(tmp_path):
    """A LoRA student's export holds its adapter (lora.safetensors for MLP students): the next stage of a recipe
    starts a LoRA student from it, and the adapter weights, not just the base, come back."""
    from stepdistill.export import export_student

    cfg = load_config(str(ROOT / "configs/dmd2_gmm.yaml"), ["teacher.backbone_hidden=32", "student.kind=lora",
                                                             "student.lora_targets=[inp, out.1]"])
    torch.manual_seed(0)  # the analytic teacher's backbone is random: both builds start from the same base
    first = build_objective(cfg, "cpu")
    with torch.no_grad():
        for name, p in first.generator.backbone.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p))
    export_student(first.generator, first.teacher, tmp_path / "final")
    assert (tmp_path / "final" / "lora.safetensors").is_file()
    cfg = load_config(str(ROOT / "configs/dmd2_gmm.yaml"), ["teacher.backbone_hidden=32", "student.kind=lora",
                                                             "student.lora_targets=[inp, out.1]",
                                                             f"student.init={tmp_path / 'final'}"])
    torch.manual_seed(0)
    second = build_objective(cfg, "cpu").generator.backbone.state_dict()
    trained = first.generator.backbone.state_dict()
    assert all(torch.equal(second[k], trained[k]) for k in trained)
    assert any("lora_" in k for k in trained)
