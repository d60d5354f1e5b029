"""Training you can trust (issue 6), in-process: exact resume, numerical faults, bad input, safe loading."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from reliability_utils import (
    assert_same,
    checkpoint_state,
    checkpoint_steps,
    make_trainer,
    tiny_tree,
    write_config,
)
from safetensors.torch import load_file, save_file
from torch import nn

from stepdistill.cli import main
from stepdistill.config import ConfigError, TeacherConfig, check_teacher_source, config_from_dict, load_config
from stepdistill.data import ConditionDataset, ImageFolderDataset
from stepdistill.io import UnsafeFileError, load_weights
from stepdistill.objectives.base import Objective, OptimizerGroup
from stepdistill.objectives.regression import Regression
from stepdistill.training import NonFiniteError
from stepdistill.training.options import lr_scheduler


class RecordingRegression(Regression):
    """Regression that records, per step, the batch it saw and the RNG state it ran under (without drawing)."""

    def loss(self, phase, batch, step):
        self.trace = getattr(self, "trace", {})
        self.trace[step] = (batch["noise"].clone(), torch.random.get_rng_state().clone())
        return super().loss(phase, batch, step)


class TwoPhase(Objective):
    """A test-only GAN-like objective with two optimizers: the critic steps every step, the generator every
    other step (the phase schedule is a function of the step, as DMD2's critic:generator ratio is); both
    phases draw noise and real samples from the global RNG."""

    name = "two_phase_test"

    def __init__(self, teacher, generator, source, config, data=None):
        super().__init__(teacher, generator, source, config, data)
        self.critic = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1))

    def optimizer_groups(self):
        return [OptimizerGroup("generator", "generator.backbone", 1e-2), OptimizerGroup("critic", "critic", 1e-2)]

    def phases(self, step):
        return ["critic", "generator"] if step % 2 == 0 else ["critic"]

    def dataset(self):
        return ConditionDataset(1, length=96)  # 3 batches of 32: many epoch boundaries in 12 steps

    def loss(self, phase, batch, step):
        n = len(batch["cond_index"])
        cond = self.source.encode(batch["cond_index"])
        noise = self.noise(n)
        fake = self.generator(noise, cond, self.generator.time(0, noise))
        if phase == "critic":
            real = self.teacher.mixture.sample(n).float()
            loss = nn.functional.softplus(self.critic(fake.detach())).mean() + \
                nn.functional.softplus(-self.critic(real)).mean()
        else:
            loss = nn.functional.softplus(-self.critic(fake)).mean()
        return {"loss": loss}


# ---------------------------------------------------------------------------------------------- exact resume
@pytest.fixture(scope="module")
def regression_reference(tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints at 5, 10, 12) with its per-step trace."""
    out = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    trainer = make_trainer(tiny_tree(out), RecordingRegression)
    trainer.train()
    return out, trainer.objective.trace


def test_resume_regression_is_bitwise_exact(regression_reference, tmp_path):
    ref_dir, ref_trace = regression_reference
    assert checkpoint_steps(ref_dir) == [5, 10, 12]
    trainer = make_trainer(tiny_tree(tmp_path, resume=str(ref_dir / "checkpoints" / "checkpoint-5")),
                           RecordingRegression)
    result = trainer.train()
    assert result.step == 12
    assert sorted(trainer.objective.trace) == list(range(5, 12))
    for step, (noise, rng) in trainer.objective.trace.items():  # data order and RNG stream per step
        assert torch.equal(noise, ref_trace[step][0]), f"batch of step {step} differs"
        assert torch.equal(rng, ref_trace[step][1]), f"RNG state of step {step} differs"
    # weights, AdamW moments, LR schedule, EMA, RNG states, step counters
    assert_same(checkpoint_state(ref_dir / "checkpoints" / "checkpoint-12"),
                checkpoint_state(tmp_path / "checkpoints" / "checkpoint-12"))
    ref_final = load_file(str(ref_dir / "final" / "generator.safetensors"))
    assert_same(ref_final, load_file(str(tmp_path / "final" / "generator.safetensors")))


def test_resume_two_optimizers_is_bitwise_exact(tmp_path):
    ref = make_trainer(tiny_tree(tmp_path / "ref"), TwoPhase)
    ref.train()
    resumed = make_trainer(tiny_tree(tmp_path / "resumed", resume=str(tmp_path / "ref/checkpoints/checkpoint-5")),
                           TwoPhase)
    resumed.train()
    a = checkpoint_state(tmp_path / "ref/checkpoints/checkpoint-12")
    b = checkpoint_state(tmp_path / "resumed/checkpoints/checkpoint-12")
    assert "optimizer_1.bin" in a and "scheduler_1.bin" in a and any(k.startswith("model_1.") for k in a)
    assert_same(a, b)
    # the phase schedule ran: the generator stepped 6 times, the critic 12 times
    assert a["optimizer.bin"]["state"][0]["step"].item() == 6
    assert a["optimizer_1.bin"]["state"][0]["step"].item() == 12


def test_resume_from_a_different_start_would_differ(regression_reference, tmp_path):
    """The bitwise tests can fail: checkpoint-10's weights resumed as if they were step 8's (steps 8 and 9 trained
    twice) end elsewhere."""
    import shutil

    ref_dir, _ = regression_reference
    shifted = tmp_path / "checkpoint-8"
    shutil.copytree(ref_dir / "checkpoints" / "checkpoint-10", shifted)
    state = json.loads((shifted / "trainer_state.json").read_text())
    (shifted / "trainer_state.json").write_text(json.dumps({**state, "step": 8}))
    make_trainer(tiny_tree(tmp_path / "run", resume=str(shifted))).train()
    a = checkpoint_state(ref_dir / "checkpoints" / "checkpoint-12")
    b = checkpoint_state(tmp_path / "run" / "checkpoints" / "checkpoint-12")
    assert not torch.equal(a["model.safetensors:blocks.0.1.weight"], b["model.safetensors:blocks.0.1.weight"])


def test_lr_schedule_is_per_training_step_whatever_the_process_count():
    """accelerate steps a prepared scheduler once per process at every training step: the schedule counts
    process-steps, so its shape over training steps is the same for 1 and 2 processes."""
    from stepdistill.config import TrainConfig

    cfg = TrainConfig(lr_scheduler="cosine", lr_warmup_steps=3, max_steps=12)
    curves = []
    for processes in (1, 2):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = lr_scheduler(cfg, opt, processes)
        curve = []
        for _ in range(13):
            curve.append(scheduler.get_last_lr()[0])
            for _ in range(processes):
                opt.step()
                scheduler.step()
        curves.append(curve)
    assert curves[0] == pytest.approx(curves[1])
    assert curves[0][0] == 0 and curves[0][3] == 1 and curves[0][12] == pytest.approx(0)


# ---------------------------------------------------------------------------------------------- numerical faults
class FaultyRegression(Regression):
    """Injects faults at fixed step indices: NaN loss, NaN gradient (finite loss), NaN weights."""

    nan_loss_at: tuple[int, ...] = ()
    nan_grad_at: tuple[int, ...] = ()
    nan_weight_at: tuple[int, ...] = ()

    def loss(self, phase, batch, step):
        self.seen = getattr(self, "seen", {})
        self.seen[step] = [p.detach().clone() for p in self.generator.parameters()]
        out = super().loss(phase, batch, step)
        if step in self.nan_loss_at:
            out = {"loss": out["loss"] * float("nan"), "l2": out["loss"].detach(), "kl": torch.tensor(float("inf"))}
        if step in self.nan_grad_at:  # d sqrt(x)/dx at 0 is inf, times 0: NaN gradient under a finite loss
            out = {"loss": out["loss"] + (sum(p.sum() for p in self.generator.parameters()) * 0).sqrt()}
        return out

    def after_step(self, phase, step):
        if step in self.nan_weight_at:
            with torch.no_grad():
                next(self.generator.parameters()).fill_(float("nan"))


def _faulty(**faults):
    return type("Faulty", (FaultyRegression,), faults)


def test_nonfinite_skip_counts_and_leaves_weights_untouched(tmp_path, caplog):
    trainer = make_trainer(tiny_tree(tmp_path, nonfinite="skip"), _faulty(nan_loss_at=(2, 6), nan_grad_at=(3,)))
    with caplog.at_level(logging.WARNING, logger="stepdistill.training"):
        result = trainer.train()
    assert result.step == 12 and result.skipped_steps == 3
    seen = trainer.objective.seen
    for s in (2, 3, 6):  # a skipped step leaves the weights as they were
        assert all(torch.equal(a, b) for a, b in zip(seen[s], seen[s + 1]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[4], seen[5]))
    assert trainer.ema.optimization_step == 12 - 3
    state = json.loads((tmp_path / "checkpoints/checkpoint-12/trainer_state.json").read_text())
    assert state["skipped_steps"] == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipping step 2: non-finite loss (loss, kl)" in m for m in messages)
    assert any("skipping step 3: non-finite gradient norm" in m and "2 skipped so far" in m for m in messages)


def test_nonfinite_stop_names_term_and_step_and_keeps_last_checkpoint(tmp_path):
    trainer = make_trainer(tiny_tree(tmp_path), _faulty(nan_loss_at=(7,)))
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(loss, kl\) in phase 'generator' at step 7"):
        trainer.train()
    assert checkpoint_steps(tmp_path) == [5]
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "checkpoints/checkpoint-5/model.safetensors")).values())


def test_nonfinite_gradient_stops(tmp_path):
    trainer = make_trainer(tiny_tree(tmp_path), _faulty(nan_grad_at=(1,)))
    with pytest.raises(NonFiniteError, match="non-finite gradient norm in phase 'generator' at step 1"):
        trainer.train()


def test_never_a_checkpoint_with_nan_weights(tmp_path):
    trainer = make_trainer(tiny_tree(tmp_path, nonfinite="skip"), _faulty(nan_weight_at=(8,)))
    with pytest.raises(NonFiniteError, match=r"step 10: non-finite weights in generator.backbone.*checkpoint-5"):
        trainer.train()
    assert checkpoint_steps(tmp_path) == [5]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def base_yaml(tmp_path):
    return write_config(tiny_tree(tmp_path / "run"), tmp_path / "tiny.yaml")


CONFIG_CASES = {
    "unknown_key": (["train.max_step=5"], "unknown config key train.max_step. Did you mean train.max_steps?"),
    "unknown_section": (["trian.max_steps=5"], "unknown config section 'trian'. Did you mean train?"),
    "wrong_type": (["train.batch_size=abc"], "train.batch_size: expected int, got 'abc'"),
    "bad_choice": (["train.nonfinite=ignore"], "train.nonfinite: 'ignore' is not one of ['stop', 'skip']"),
    "zero_batch": (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
    "negative_steps": (["train.max_steps=-5"], "train.max_steps must be >= 1, got -5"),
    "zero_lr": (["objective.lr=0"], "objective.lr must be > 0, got 0.0"),
    "ema_decay_one": (["train.ema_decay=1"], "train.ema_decay must lie in [0,1), got 1.0"),
    "no_checkpoints_kept": (["train.checkpoints_limit=0"], "train.checkpoints_limit must be >= 1"),
    "negative_std": (["teacher.std=-0.1"], "teacher.std must be > 0"),
    "override_without_equals": (["train.max_steps"], "must look like section.key=value"),
    "bad_objective": (["objective.name=dmd3"], "objective.name: 'dmd3' is not one of"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(case, base_yaml):
    overrides, message = CONFIG_CASES[case]
    with pytest.raises(ConfigError) as e:
        load_config(base_yaml, overrides)
    assert message in str(e.value)


def test_missing_config_file_through_cli(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "stepdistill: error: config file" in capsys.readouterr().err


def test_bad_key_through_cli_fails_before_work(base_yaml, tmp_path, capsys):
    assert main(["train", "--config", str(base_yaml), "train.batch_sise=8"]) == 2
    assert "Did you mean train.batch_size?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _pipeline(folder: Path, **components) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", **components}))
    for name, (library, _) in components.items():
        if library is not None:
            (folder / name).mkdir()
    return folder


TEACHER_CASES = {
    "no_path": (dict(kind="sd"), "teacher.path is empty for teacher.kind=sd"),
    "missing_folder": (dict(kind="sd", path="./no/such/model"), "model folder does not exist"),
    "not_a_pipeline": (dict(kind="sd", path="{tmp}/plain"), "is not a diffusers pipeline folder (no model_index.json)"),
    "custom_code": (dict(kind="sd", path="{tmp}/custom"), "needs custom code (unet, unet/my_unet.py)"),
    "hub_offline": (dict(kind="sd", path="nobody/not-cached-model", local_files_only=True),
                    "is a hub id but the hub is offline"),
    "path_with_gmm": (dict(kind="gmm", path="some/model"), "teacher.path is set but teacher.kind is gmm"),
}


@pytest.mark.parametrize("case", sorted(TEACHER_CASES))
def test_bad_teacher_source(case, tmp_path):
    (tmp_path / "plain").mkdir()
    _pipeline(tmp_path / "custom", unet=["my_unet", "MyUNet"], vae=["diffusers", "AutoencoderKL"])
    (tmp_path / "custom" / "unet" / "my_unet.py").write_text("raise SystemExit")
    fields, message = TEACHER_CASES[case]
    fields = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in fields.items()}
    with pytest.raises(ConfigError) as e:
        check_teacher_source(TeacherConfig(**fields))
    assert message in str(e.value)


def test_teacher_source_accepts_good_pipelines(tmp_path):
    good = _pipeline(tmp_path / "good", unet=["diffusers", "UNet2DConditionModel"], safety_checker=[None, None],
                     feature_extractor=["transformers", "CLIPImageProcessor"],
                     old_checker=["stable_diffusion", "StableDiffusionSafetyChecker"])
    check_teacher_source(TeacherConfig(kind="sd", path=str(good)))
    custom = _pipeline(tmp_path / "custom", unet=["my_unet", "MyUNet"])
    check_teacher_source(TeacherConfig(kind="sd", path=str(custom), trust_remote_code=True))


def test_bad_teacher_path_fails_in_trainer_before_output(tmp_path):
    tree = tiny_tree(tmp_path / "run")
    tree["teacher"] = {"kind": "sd", "path": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match="model folder does not exist"):
        make_trainer(tree)
    assert not (tmp_path / "run").exists()


def test_empty_and_missing_prompt_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    tree = tiny_tree(tmp_path / "run")
    tree["data"] = {"prompts_file": str(tmp_path / "empty.txt")}
    with pytest.raises(ValueError, match="holds no prompt: write one prompt per line"):
        make_trainer(tree)
    tree["data"] = {"prompts_file": str(tmp_path / "missing.txt")}
    with pytest.raises(FileNotFoundError, match="prompts file .* does not exist"):
        make_trainer(tree)


class FlowOnly(Regression):
    def check_compatible(self):
        if self.teacher.schedule.kind != "flow":
            raise ValueError("objective flow_only needs a flow-matching teacher: set teacher.schedule=flow")


def test_objective_incompatible_with_teacher_fails_before_pairs(tmp_path):
    with pytest.raises(ValueError, match="needs a flow-matching teacher"):
        make_trainer(tiny_tree(tmp_path), FlowOnly)
    assert not (tmp_path / "pairs").exists()


def test_student_prediction_type_incompatible_with_teacher(tmp_path):
    tree = tiny_tree(tmp_path)
    tree["student"]["prediction_type"] = "flow"
    with pytest.raises(ValueError, match="student.prediction_type=flow does not fit the student's vp schedule.*student.schedule=flow"):
        make_trainer(tree, Regression)
    assert not (tmp_path / "pairs").exists()


def test_resolution_the_teacher_cannot_produce(tmp_path):
    tree = tiny_tree(tmp_path)
    tree["data"] = {"resolution": 64}
    with pytest.raises(ValueError, match="GMMTeacher teacher does not make images; set data.resolution=0"):
        make_trainer(tree)


def _images(folder: Path, sizes: list[int], broken: int = 0) -> Path:
    folder.mkdir()
    for i, s in enumerate(sizes):
        Image.new("RGB", (s, s), (i * 40, 0, 0)).save(folder / f"img{i}.png")
    for i in range(broken):
        (folder / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def test_image_folder_refuses_unreadable_and_mis_sized(tmp_path):
    with pytest.raises(ValueError, match=r"has 1 bad files.*unreadable: .*broken0.jpg.*data.bad_images=skip"):
        ImageFolderDataset(_images(tmp_path / "a", [16, 16], broken=1), 16)
    with pytest.raises(ValueError, match=r"has 1 bad files \(expected 16x16\): mis-sized: .*img1.png \(20x20\)"):
        ImageFolderDataset(_images(tmp_path / "b", [16, 20]), 16)


def test_image_folder_skips_and_counts(tmp_path, caplog):
    folder = _images(tmp_path / "imgs", [16, 20, 16], broken=2)
    data = ImageFolderDataset(folder, 16, "skip")
    assert len(data) == 2 and data.num_skipped == 3
    assert data[0]["image"].shape == (3, 16, 16) and data[0]["image"].min() >= -1
    tree = tiny_tree(tmp_path / "run")
    tree["data"] = {"image_dir": str(folder), "resolution": 16, "bad_images": "skip"}
    with caplog.at_level(logging.WARNING, logger="stepdistill.training"):
        with pytest.raises(ValueError, match="does not make images"):  # images pass; the GMM teacher then refuses
            make_trainer(tree)
    assert any("skipped 3 bad files (2 unreadable, 1 mis-sized)" in r.getMessage() for r in caplog.records)


def test_image_folder_missing_or_all_bad(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.image_dir .* does not exist"):
        ImageFolderDataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="holds no usable image"):
        ImageFolderDataset(_images(tmp_path / "bad", [], broken=2), 0, "skip")


def test_output_dir_holding_another_run(regression_reference, tmp_path):
    ref_dir, _ = regression_reference
    with pytest.raises(ValueError, match="already holds a run: set train.resume=latest"):
        make_trainer(tiny_tree(ref_dir))
    tree = tiny_tree(ref_dir, resume="latest")
    tree["teacher"]["num_modes"] = 8
    with pytest.raises(ConfigError, match=r"checkpoint-12 was written with another config \(teacher.num_modes: 4 "
                                          r"there, 8 here\)"):
        make_trainer(tree)


def test_resume_path_not_a_checkpoint(tmp_path):
    partial = tmp_path / "checkpoints" / ".tmp-checkpoint-5"
    with pytest.raises(ConfigError, match="does not exist"):
        make_trainer(tiny_tree(tmp_path, resume=str(partial)))
    partial.mkdir(parents=True)  # an interrupted write: the folder without its trainer state
    with pytest.raises(ConfigError, match="is not a complete checkpoint"):
        make_trainer(tiny_tree(tmp_path, resume=str(partial)))


def test_resume_checkpoint_of_another_model(regression_reference, tmp_path):
    ref_dir, _ = regression_reference
    tree = tiny_tree(tmp_path, resume=str(ref_dir / "checkpoints" / "checkpoint-5"))
    tree["teacher"]["backbone_hidden"] = 48
    with pytest.raises(ConfigError, match=r"written with another config \(teacher.backbone_hidden: 32 there, 48 "
                                          r"here\)"):
        make_trainer(tree)


def test_batch_larger_than_dataset(tmp_path):
    with pytest.raises(ValueError, match="larger than the dataset .256 items.: lower train.batch_size"):
        make_trainer(tiny_tree(tmp_path, batch_size=512))


# ---------------------------------------------------------------------------------------------- safe loading
class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_checkpoint_is_refused_without_running_it(regression_reference, tmp_path):
    ref_dir, _ = regression_reference
    import shutil

    ckpt = tmp_path / "checkpoint-5"
    shutil.copytree(ref_dir / "checkpoints" / "checkpoint-5", ckpt)
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "evil": Payload(marker)}, ckpt / "optimizer.bin")
    trainer = make_trainer(tiny_tree(tmp_path / "run", resume=str(ckpt)))
    with pytest.raises(UnsafeFileError, match="holds pickled Python objects, not only tensors; refusing"):
        trainer.train()
    assert not marker.exists()


def test_load_weights_safetensors_tensors_only_and_refused_pickle(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    torch.save({"w": torch.ones(2)}, tmp_path / "b.bin")
    assert torch.equal(load_weights(tmp_path / "a.safetensors")["w"], load_weights(tmp_path / "b.bin")["w"])
    marker = tmp_path / "code-ran"
    with open(tmp_path / "c.ckpt", "wb") as f:
        pickle.dump({"w": Payload(marker)}, f)
    with pytest.raises(UnsafeFileError, match="refusing to load it"):
        load_weights(tmp_path / "c.ckpt")
    assert not marker.exists()


def test_checkpoints_hold_no_pickled_objects(regression_reference):
    """Every file of a checkpoint loads as safetensors or tensors-only (the EMA is not pickled)."""
    ref_dir, _ = regression_reference
    folder = ref_dir / "checkpoints" / "checkpoint-12"
    assert (folder / "ema.safetensors").is_file()
    for f in folder.iterdir():
        if f.suffix in (".bin", ".pkl"):
            checkpoint_state(folder)  # accelerate's load: weights_only=True with numpy arrays allowed
    assert not list(folder.glob("custom_checkpoint_*"))


def test_trust_remote_code_defaults_off():
    assert config_from_dict({}).teacher.trust_remote_code is False


def test_resume_dmd2_is_bitwise_exact(tmp_path):
    """Generator + fake-score critic with its GAN head, 2 critic updates per generator update, resumed at an
    odd step (mid-cycle of the phase counter)."""
    def tree(out, **train):
        t = tiny_tree(out, **train)
        t["objective"] = {"name": "dmd2", "generator_lr": 1e-3, "critic_lr": 1e-3, "critic_updates": 2,
                          "real_data": "mixture", "real_guidance": 1.0}
        t["student"].pop("prediction_type")
        return t

    make_trainer(tree(tmp_path / "ref")).train()
    make_trainer(tree(tmp_path / "resumed", resume=str(tmp_path / "ref/checkpoints/checkpoint-5"))).train()
    a = checkpoint_state(tmp_path / "ref/checkpoints/checkpoint-12")
    steps = sorted(int(a[f]["state"][0]["step"]) for f in ("optimizer.bin", "optimizer_1.bin"))
    assert steps[0] < steps[1]  # the generator stepped less often than the critic
    assert_same(a, checkpoint_state(tmp_path / "resumed/checkpoints/checkpoint-12"))
