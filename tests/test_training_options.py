"""Speed and memory options of the trainer (issue 7): train.optimizer, train.channels_last, train.compile,
train.attention, teacher.offload and the DeepSpeed guard. Each test compares against the default trainer on the
same seed, or asserts the refusal happens before any work, so a silently ignored option fails it."""
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
from stepdistill.objectives import build_objective
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer, accel
from stepdistill.training import trainer as trainer_module
from stepdistill.training.accel import check_distributed
from stepdistill.training.options import check_fused_adamw, offload_teacher


def gmm_trainer(out: Path, **train) -> Trainer:
    """The reliability tests' tiny GMM regression run (MLP 2 -> 32 -> 2), constant LR so both steps move it."""
    tree = tiny_tree(out, max_steps=2, checkpoint_every=0, lr_scheduler="constant", lr_warmup_steps=0, **train)
    return Trainer(config_from_dict(tree))


def run_steps(trainer: Trainer, n: int) -> dict[str, torch.Tensor]:
    """n training steps as the loop takes them; the generator's weights after them."""
    trainer.train_steps(n)
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
    exports = {name: t.output_dir / "final" for name, t in (("eager", eager), ("compiled", compiled))}
    for name, t in (("eager", eager), ("compiled", compiled)):
        export_student(t.generator_for_inference(), t.objective.teacher, exports[name])
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
    batch = next(plain.batches())
    for phase in ("generator", "critic"):
        losses = {}
        for name, t in (("plain", plain), ("fast", fast)):
            t.seed_step()
            losses[name] = t.objective.loss(phase, batch, 0)["loss"].detach()
        torch.testing.assert_close(losses["fast"], losses["plain"], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- attention
def no_teacher_load(monkeypatch) -> None:
    """Makes loading a teacher (building the objective) fail the test: refusals must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the refusal")

    monkeypatch.setattr(trainer_module, "build_objective", refuse)


def test_attention_choices_and_missing_xformers_fails_before_the_teacher_loads(tiny_sd, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.attention: 'flash' is not one of \['sdpa', 'xformers'\]"):
        load_config(None, ["train.attention=flash"])
    assert load_config(None, []).train.attention == "sdpa"
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails, as where it is not installed
    no_teacher_load(monkeypatch)
    with pytest.raises(ConfigError, match=r'train.attention=xformers needs xformers.*pip install -e "\.\[xformers\]"'
                                          r".*train.attention=sdpa"):
        dmd2_sd_trainer(tiny_sd, tmp_path / "run", "train.attention=xformers")


def test_xformers_switches_generator_critic_and_teacher_and_sdpa_keeps_attnprocessor2_0(tiny_sd, tmp_path,
                                                                                        monkeypatch):
    from diffusers import ModelMixin
    from diffusers.models.attention_processor import AttnProcessor2_0

    plain = dmd2_sd_trainer(tiny_sd, tmp_path / "plain")
    switched: list[torch.nn.Module] = []
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))  # importable stand-in
    # diffusers' real method needs CUDA and the xformers kernels: record the calls instead
    monkeypatch.setattr(ModelMixin, "enable_xformers_memory_efficient_attention", lambda self: switched.append(self))
    fast = dmd2_sd_trainer(tiny_sd, tmp_path / "fast", "train.attention=xformers")

    def networks(trainer: Trainer) -> list[torch.nn.Module]:
        o = trainer.objective
        return [o.generator.backbone, o.critic.fake_score, o.teacher.backbone]

    assert sorted(map(id, switched)) == sorted(map(id, networks(fast)))  # each network once, nothing else
    processors = [p for net in networks(plain) for p in net.attn_processors.values()]
    assert processors and all(type(p) is AttnProcessor2_0 for p in processors)  # sdpa: diffusers' default


# ---------------------------------------------------------------------------------------------- teacher.offload
@pytest.mark.parametrize("extra, key", [
    (["objective.critic_lora_rank=4", "objective.critic=shared_base"], "this dmd2 config: a trained network uses "
                                                                      "the teacher's own backbone"),
    (["train.compile=true"], "train.compile=true: "),
])
def test_teacher_offload_refusals_before_the_teacher_loads(tiny_sd, tmp_path, monkeypatch, extra, key):
    no_teacher_load(monkeypatch)
    with pytest.raises(ConfigError, match=rf"teacher.offload=true does not work with {key}.*"
                                          r"or set teacher.offload=false|teacher.offload=true does not work with "
                                          rf"{key}.*or teacher.offload=false"):
        dmd2_sd_trainer(tiny_sd, tmp_path, "teacher.offload=true", *extra)


def test_teacher_offload_refuses_lora_base_and_gmm(tiny_sd, tmp_path, monkeypatch):
    no_teacher_load(monkeypatch)
    lcm = load_config(str(Path(__file__).resolve().parents[1] / "configs/lcm_sd15.yaml"), [
        "teacher.kind=auto", f"teacher.path={tiny_sd}", f"train.output_dir={tmp_path / 'lcm'}", "student.kind=lora",
        "objective.teacher_net=lora_base", "teacher.offload=true", "train.report_to=none"])
    with pytest.raises(ConfigError, match="does not work with this consistency config: a trained network uses the "
                                          "teacher's own backbone.*or set teacher.offload=false"):
        Trainer(lcm)
    gmm = config_from_dict(tiny_tree(tmp_path / "gmm"))
    gmm.teacher.offload = True
    with pytest.raises(ConfigError, match="teacher.kind=gmm: the analytic teacher has no network weights"):
        Trainer(gmm)


def test_offload_teacher_refuses_a_backbone_shared_with_a_trained_network(tiny_sd):
    """The structural guard behind the config check: DMD2's shared base holds the critic's trainable LoRA."""
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs/dmd2_sd15.yaml"), [
        "teacher.kind=auto", f"teacher.path={tiny_sd}", "objective.real_data=''", "objective.critic_lora_rank=4",
        "objective.critic=shared_base"])
    objective = build_objective(cfg, "cpu")
    with pytest.raises(ConfigError, match="teacher's backbone has trainable parameters"):
        offload_teacher(objective.teacher, torch.device("cpu"))
    assert not hasattr(objective.teacher.backbone, "_hf_hook")


def offload_weights(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The CPU state dict accelerate's hooks stream weights from."""
    maps = {id(m._hf_hook.weights_map.dataset): m._hf_hook.weights_map.dataset for m in backbone.modules()
            if getattr(getattr(m, "_hf_hook", None), "weights_map", None) is not None}
    assert len(maps) == 1
    return next(iter(maps.values()))


def test_teacher_offload_streams_cpu_weights_and_predicts_bitwise(tiny_sd, tmp_path, caplog):
    """On a CPU run the trainer leaves the teacher alone and warns; offload_teacher itself (the accelerator path,
    executed here on the CPU) hooks the backbone, keeps its weights in a CPU map that objective.to(device) does not
    move, and the teacher's predictions and DMD2's generator loss stay bitwise equal."""
    with caplog.at_level("WARNING", logger="stepdistill.training"):
        trainer = dmd2_sd_trainer(tiny_sd, tmp_path, "teacher.offload=true")
    assert "teacher.offload=true has no effect on a CPU run" in caplog.text
    teacher = trainer.objective.teacher
    backbone = teacher.backbone
    assert not hasattr(backbone, "_hf_hook") and all(p.device.type == "cpu" for p in backbone.parameters())
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(2, *teacher.sample_shape)
    t = torch.tensor([999.0, 400.0])
    cond = teacher.encode(["a red circle", "a blue square"])
    batch = next(trainer.batches())

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        trainer.seed_step()
        return (teacher.predict(x, t, cond, guidance=1.75).x0,
                trainer.objective.loss("generator", batch, 0)["loss"].detach())

    before = outputs()
    assert offload_teacher(teacher, torch.device("cpu")) is backbone and hasattr(backbone, "_hf_hook")
    assert all(p.device.type == "meta" for p in backbone.parameters())  # no resident copy of the weights
    after = outputs()
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    trainer.objective.to("meta")  # another device: the teacher is no submodule, its weights do not follow
    streamed = offload_weights(backbone)
    assert streamed.keys() == weights.keys()
    assert all(v.device.type == "cpu" and torch.equal(v, weights[k]) for k, v in streamed.items())
    assert torch.equal(teacher.predict(x, t, cond, guidance=1.75).x0, before[0])


# ---------------------------------------------------------------------------------------------- DeepSpeed
def test_check_distributed_refuses_deepspeed_with_several_optimizer_groups():
    from accelerate.utils import DistributedType

    with pytest.raises(ConfigError, match=r"DeepSpeed .* 2 optimizer groups \(generator, critic\).*"
                                          r"configs/accelerate/fsdp.yaml"):
        check_distributed(DistributedType.DEEPSPEED, ["generator", "critic"])
    check_distributed(DistributedType.DEEPSPEED, ["generator"])  # one group: one engine
    for other in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.FSDP):
        check_distributed(other, ["generator", "critic"])


def test_trainer_checks_deepspeed_groups_before_prepare(tmp_path, monkeypatch):
    """Under a (simulated) DeepSpeed launch DMD2 stops before accelerate.prepare; a one-group objective reaches it."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    class DeepSpeedAccelerator(Accelerator):
        launched = False

        @property
        def distributed_type(self):
            return DistributedType.DEEPSPEED if self.launched else self.state.distributed_type

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.launched = True

        def prepare(self, *args, **kwargs):
            raise AssertionError("accelerate.prepare reached")

    monkeypatch.setattr(accel, "Accelerator", DeepSpeedAccelerator)
    dmd2 = load_config(str(Path(__file__).resolve().parents[1] / "configs/dmd2_gmm.yaml"),
                       [f"train.output_dir={tmp_path / 'dmd2'}", "train.batch_size=8"])
    with pytest.raises(ConfigError, match="optimizer groups .*configs/accelerate/fsdp.yaml"):
        Trainer(dmd2)
    with pytest.raises(AssertionError, match="accelerate.prepare reached"):
        Trainer(config_from_dict(tiny_tree(tmp_path / "regression")))


def test_deepspeed_zero2_accelerate_config_parses():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = Path(__file__).resolve().parents[1] / "configs/accelerate/deepspeed_zero2.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type == DistributedType.DEEPSPEED and cfg.mixed_precision == "bf16"
    assert cfg.num_machines == 1 and cfg.deepspeed_config["zero_stage"] == 2
    assert "accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml" in path.read_text()


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision is fixed by the first Accelerator: reset it
    around a test that needs another precision, so neither it nor the tests after it inherit the other's."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_generator_for_inference_drops_the_autocast_wrapper(tmp_path, fresh_accelerator_state):
    """After a bf16 run the generator used for export and in-process sampling runs in its own dtype (fp32), as the
    exported weights do, instead of keeping accelerate's bf16 autocast forward."""
    trainer = gmm_trainer(tmp_path / "run", mixed_precision="bf16")
    trainer.train_steps(1)
    wrapped = trainer.objective.generator.backbone
    x = torch.randn(64, 2)
    t = torch.full((64,), 999.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_out = wrapped(x, t).float()
    backbone = trainer.generator_for_inference().backbone
    plain = type(backbone).forward(backbone, x, t)
    assert torch.equal(backbone(x, t), plain)
    assert not torch.allclose(plain, bf16_out, atol=1e-4)  # the wrapper would have changed the numbers
