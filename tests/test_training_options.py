"""Speed and memory options of the trainer (issue 7): train.optimizer, train.channels_last, train.compile.
Each test compares against the default trainer on the same seed, so a silently ignored option fails it."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from reliability_utils import tiny_tree
from safetensors import safe_open

from stepdistill.config import ConfigError, config_from_dict, load_config
from stepdistill.export import export_student
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer, check_fused_adamw


def gmm_trainer(out: Path, **train) -> Trainer:
    """The reliability tests' tiny GMM regression run (MLP 2 -> 32 -> 2), constant LR so both steps move it."""
    tree = tiny_tree(out, max_steps=2, checkpoint_every=0, lr_scheduler="constant", lr_warmup_steps=0, **train)
    return Trainer(config_from_dict(tree))


def run_steps(trainer: Trainer, n: int) -> dict[str, torch.Tensor]:
    """n training steps as Trainer._loop takes them; the generator's weights after them."""
    batches = trainer._batches()
    for _ in range(n):
        batch = next(batches)
        trainer._seed_step()
        trainer.train_step(batch)
        trainer.step += 1
    return {k: v.detach().clone() for k, v in trainer.objective.generator.backbone.state_dict().items()}


def assert_moved_and_close(a: dict, b: dict, start: dict, atol: float) -> None:
    """`a` equals `b` within atol, and training moved the weights by more than that (a real comparison)."""
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], atol=atol, rtol=0)
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 100 * atol


def safetensors_keys(folder: Path) -> dict[str, set[str]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out[f.name] = set(h.keys())
    return out


# ---------------------------------------------------------------------------------------------- optimizer
def test_optimizer_choices_are_validated():
    with pytest.raises(ConfigError, match=r"train.optimizer: 'sgd' is not one of \['adamw', 'adamw_fused', "
                                          r"'adamw_8bit'\]"):
        load_config(None, ["train.optimizer=sgd"])
    with pytest.raises(ConfigError, match="train.compile: expected bool"):
        load_config(None, ["train.compile=fast"])


def test_fused_adamw_sets_fused_and_matches_unfused(tmp_path):
    plain = gmm_trainer(tmp_path / "plain")
    start = {k: v.clone() for k, v in plain.objective.generator.backbone.state_dict().items()}
    fused = gmm_trainer(tmp_path / "fused", optimizer="adamw_fused")
    assert all(g["fused"] is True for g in fused.optimizers["generator"].param_groups)
    assert all(not g["fused"] for g in plain.optimizers["generator"].param_groups)
    assert_moved_and_close(run_steps(fused, 2), run_steps(plain, 2), start, atol=1e-6)


def test_fused_adamw_on_a_device_without_the_kernel_fails_clearly():
    check_fused_adamw(torch.device("cpu"))  # torch 2.4+ has the CPU kernel
    with pytest.raises(ConfigError, match="train.optimizer=adamw_fused: .* no fused AdamW on meta .* "
                                          "set train.optimizer=adamw"):
        check_fused_adamw(torch.device("meta"))  # a device torch has no fused kernel for


def test_adamw_8bit_without_bitsandbytes_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as where it is not installed
    cfg = config_from_dict(tiny_tree(tmp_path, optimizer="adamw_8bit"))
    with pytest.raises(ConfigError, match="train.optimizer=adamw_8bit needs bitsandbytes.*pip install bitsandbytes"):
        Trainer(cfg)
    assert not (tmp_path / "pairs").exists() and not any(tmp_path.iterdir()), "failed before any work"


def test_adamw_8bit_uses_bitsandbytes_adamw8bit(tmp_path, monkeypatch):
    class AdamW8bit(torch.optim.AdamW):  # stands in for bitsandbytes.optim.AdamW8bit (same signature)
        pass

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.ModuleType("bitsandbytes.optim")
    fake.optim.AdamW8bit = AdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake.optim)
    trainer = gmm_trainer(tmp_path, optimizer="adamw_8bit")
    opt = trainer.optimizers["generator"].optimizer
    assert type(opt) is AdamW8bit and opt.param_groups[0]["lr"] == pytest.approx(1e-2)


# ---------------------------------------------------------------------------------------------- compile
def test_compile_matches_eager_and_keeps_checkpoint_and_export_keys(tmp_path):
    """Two steps of the tiny MLP under torch.compile (inductor on CPU: 20-50 s with a cold compile cache, a few
    seconds warm) equal eager ones; checkpoint, EMA and export files hold the same keys (no `_orig_mod.`)."""
    eager = gmm_trainer(tmp_path / "eager", ema_decay=0.9)
    start = {k: v.clone() for k, v in eager.objective.generator.backbone.state_dict().items()}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = gmm_trainer(tmp_path / "compiled", ema_decay=0.9, compile=True)
    eager_weights = run_steps(eager, 2)
    assert_moved_and_close(run_steps(compiled, 2), eager_weights, start, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "the generator ran compiled"

    folders = {name: t.save_checkpoint() for name, t in (("eager", eager), ("compiled", compiled))}
    keys = {name: safetensors_keys(f) for name, f in folders.items()}
    assert keys["eager"] == keys["compiled"] and "ema.safetensors" in keys["eager"]
    assert not any("_orig_mod" in k for names in keys["compiled"].values() for k in names)
    exports = {name: export_student(t.generator_for_inference(), t.output_dir / "final")
               for name, t in (("eager", eager), ("compiled", compiled))}
    assert safetensors_keys(exports["eager"]) == safetensors_keys(exports["compiled"])

    resumed = gmm_trainer(tmp_path / "resumed", ema_decay=0.9, compile=True)
    resumed.load_checkpoint(folders["eager"])  # an eager checkpoint resumes into a compiled run
    assert resumed.step == 2
    for k, v in resumed.objective.generator.backbone.state_dict().items():
        assert torch.equal(v, eager_weights[k])


# ---------------------------------------------------------------------------------------------- channels_last
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny") / "sd")


def dmd2_sd_trainer(folder: Path, out: Path, *extra: str) -> Trainer:
    """DMD2 on the tiny SD pipeline: generator, fake-score critic (with its conv GAN head) and the teacher UNet."""
    return Trainer(load_config(str(Path(__file__).resolve().parents[1] / "configs/dmd2_sd15.yaml"), [
        "teacher.kind=auto", f"teacher.path={folder}", "objective.real_data=''", f"train.output_dir={out}",
        "train.batch_size=2", "train.max_steps=2", "train.mixed_precision='no'", "train.gradient_checkpointing=false",
        "train.report_to=none", "train.progress=false", *extra]))


def spatial_convs(module: torch.nn.Module) -> list[torch.Tensor]:
    """Conv weights with a kernel larger than 1x1 (for 1x1 kernels both memory formats are the same strides)."""
    return [p for p in module.parameters() if p.ndim == 4 and p.shape[-1] * p.shape[-2] > 1]


def test_channels_last_converts_backbones_and_keeps_the_loss(tiny_sd, tmp_path):
    plain = dmd2_sd_trainer(tiny_sd, tmp_path / "plain")
    fast = dmd2_sd_trainer(tiny_sd, tmp_path / "fast", "train.channels_last=true")
    fast_objective = fast.objective
    networks = {"generator": fast_objective.generator.backbone, "teacher": fast_objective.teacher.backbone,
                "critic": fast_objective.critic.fake_score}
    for name, net in networks.items():
        convs = spatial_convs(net)
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs), name
    assert not any(p.is_contiguous(memory_format=torch.channels_last)
                   for p in spatial_convs(plain.objective.generator.backbone))
    batch = next(plain._batches())
    for phase in ("generator", "critic"):
        losses = {}
        for name, t in (("plain", plain), ("fast", fast)):
            t._seed_step()
            losses[name] = t.objective.loss(phase, batch, 0)["loss"].detach()
        torch.testing.assert_close(losses["fast"], losses["plain"], rtol=1e-4, atol=1e-6)
