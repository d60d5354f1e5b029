"""DMD2's shared-base critic (objective.critic=shared_base): the fake score is a LoRA injected into the teacher's
own backbone, with no second copy of the frozen weights; every teacher evaluation runs with the adapters off and
the critic's with them on. Checked on an MLP teacher (the GMM bench with a network denoiser) and on the tiny SD /
SDXL diffusers UNets."""
import copy
from itertools import chain

import pytest
import torch

from stepdistill.config import StudentConfig, load_config
from stepdistill.data import ConditionSource
from stepdistill.mlp import TimeCondMLP
from stepdistill.objectives import build_objective
from stepdistill.objectives.score_distillation.critic import frozen
from stepdistill.objectives.score_distillation.dmd2 import DMD2, DMD2Config
from stepdistill.perf.memory import build_meta_objective, estimate, storage_bytes
from stepdistill.students import build_student
from stepdistill.teachers.gmm import GaussianMixture, GMMTeacher
from stepdistill.training import Trainer
from stepdistill.training.lean import optimize

torch.set_num_threads(1)
HIDDEN = 32


class MLPTeacher(GMMTeacher):
    """The class-conditional ring bench with a network teacher: a frozen TimeCondMLP (random weights, seeded)
    denoises. The analytic GMMTeacher has no backbone to share."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(GaussianMixture.ring(8, num_classes=4), backbone_hidden=HIDDEN)
        torch.manual_seed(seed)
        self.backbone = TimeCondMLP(2, self.num_classes, HIDDEN, 4).requires_grad_(False).eval()

    def model_output(self, x_t, t, fields):
        return self.call(self.backbone, x_t, t, fields)

    def share_backbone(self, net):
        self.backbone = net

    def build_backbone(self):
        return copy.deepcopy(self.backbone).requires_grad_(True).train()


def mlp_objective(shared: bool = True, rank: int = 4, real_data: str = "mixture", seed: int = 0) -> DMD2:
    teacher = MLPTeacher(seed)
    generator = build_student(teacher, StudentConfig(timesteps=[999], prediction_type="sample"))
    config = DMD2Config(critic_lora_rank=rank, critic="shared_base" if shared else "lora", real_data=real_data,
                        critic_updates=2,
                        generator_lr=1e-3, critic_lr=1e-2, weight_decay=0.0, real_guidance=2.0, max_step=0.5)
    torch.manual_seed(seed + 1)  # the GAN head's initialization
    return DMD2(teacher, generator, ConditionSource(teacher), config)


def probe(teacher, n: int = 64):
    """Fixed inputs over the whole timestep range and all classes."""
    g = torch.Generator().manual_seed(123)
    x_t = torch.randn(n, 2, generator=g)
    t = torch.linspace(0, 999, n)
    return x_t, t, teacher.encode(torch.arange(n) % teacher.num_classes)


def lora_params(obj: DMD2) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in obj.critic.fake_score.named_parameters() if "lora_" in n}


# ------------------------------------------------------------------ (1) the teacher always sees its base weights
def test_teacher_predictions_stay_bitwise_the_base_while_the_critic_moves_away():
    obj = mlp_objective()
    reference = MLPTeacher(0)  # the same weights, never given an adapter
    x_t, t, cond = probe(reference)
    optimize(obj, steps=20, batch_size=64)
    assert max(p.abs().max() for n, p in lora_params(obj).items() if "lora_B" in n) > 1e-3  # LoRA trained (B starts 0)
    for guidance in (1.0, 2.0):
        got, want = obj.teacher.predict(x_t, t, cond, guidance), reference.predict(x_t, t, cond, guidance)
        assert torch.equal(got.x0, want.x0) and torch.equal(got.eps, want.eps)
    noise = torch.randn(64, 2)
    assert torch.equal(obj.teacher.sample(noise, cond, 4, 2.0), reference.sample(noise, cond, 4, 2.0))
    assert not obj.critic.holds_features  # the GAN hook on the shared bottleneck kept nothing of the teacher's calls
    # the critic is the same module with the adapters on: its output has left the teacher's
    fake = obj.critic(x_t, t, cond.fields)[0]
    assert (fake - reference.model_output(x_t, t, cond.fields)).abs().max() > 1e-2
    assert obj.critic.fake_score is obj.teacher.backbone.net  # one module, no copy


# ------------------------------------------------------------------ (2) which parameters each phase trains
def trained_by(obj: DMD2, phase: str) -> set[str]:
    for p in obj.parameters():
        p.grad = None
    obj.loss(phase, {"cond_index": torch.arange(16) % 4}, 0)["loss"].backward()
    return {n for n, p in obj.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_critic_phase_trains_only_lora_and_head_generator_phase_only_the_generator():
    obj = mlp_objective()
    optimize(obj, steps=4, batch_size=32)  # LoRA B != 0, so gradients reach lora_A too
    base = list(obj.teacher.backbone.net.parameters())
    critic = trained_by(obj, "critic")
    assert {n for n in critic if "lora_A" in n} and {n for n in critic if "lora_B" in n}
    assert {n for n in critic if n.startswith("critic.head.")}
    assert all(n.startswith("critic.head.") or "lora_" in n for n in critic), critic
    assert all(p.grad is None for n, p in obj.teacher.backbone.net.named_parameters() if "lora_" not in n)
    generator = trained_by(obj, "generator")
    assert generator and all(n.startswith("generator.") for n in generator), generator
    assert all(p.grad is None for p in base)
    # the base stays frozen, the adapters trainable, whatever the teacher calls in between toggled
    assert all(p.requires_grad == ("lora_" in n) for n, p in obj.teacher.backbone.net.named_parameters())
    x_t, t, cond = probe(obj.teacher, 8)
    with frozen(obj.critic):  # the generator's GAN pass: a teacher call here must not unfreeze the adapters
        obj.teacher.predict(x_t, t, cond, 2.0)
        assert not any(p.requires_grad for p in lora_params(obj).values())
    assert all(p.requires_grad for p in lora_params(obj).values())


# ------------------------------------------------------------------ (3) one set of frozen weights
def test_shared_base_holds_one_backbone_plus_lora():
    def weight_bytes(obj: DMD2) -> int:
        return storage_bytes(chain(obj.teacher.backbone.parameters(), obj.parameters()))

    shared, copied = mlp_objective(shared=True, real_data=""), mlp_objective(shared=False, real_data="")
    backbone = storage_bytes(MLPTeacher(0).backbone.parameters())
    lora = sum(p.numel() * p.element_size() for p in lora_params(shared).values())
    generator = storage_bytes(shared.generator.parameters())
    assert weight_bytes(shared) == generator + backbone + lora
    assert weight_bytes(copied) - weight_bytes(shared) == backbone  # the frozen copy the option removes


def test_memory_planner_counts_the_shared_unet_once():
    """SDXL preset on the tiny SDXL architecture (meta device): the shared base saves exactly the fp32 frozen UNet
    copy of critic_lora_rank alone, and nothing is counted twice."""
    def plan(*extra: str):
        cfg = load_config("configs/dmd2_sdxl_1step.yaml", ["train.batch_size=1", "objective.critic_lora_rank=4", *extra])
        obj = build_meta_objective(cfg, "tiny-sdxl")
        return obj, estimate(obj, 1, "no")

    copied, est_copied = plan("objective.critic=lora")
    shared, est_shared = plan("objective.critic=shared_base")
    unet_fp32 = 4 * sum(p.numel() for n, p in shared.teacher.backbone.named_parameters() if "lora_" not in n)
    assert est_copied.weights - est_shared.weights == unet_fp32
    assert est_shared.by_module["objective (students, critics, targets)"] == \
        storage_bytes(shared.generator.parameters())  # the critic's base and LoRA sit in teacher.backbone
    assert est_shared.options["trainable_params"]["critic"] == est_copied.options["trainable_params"]["critic"]


# ------------------------------------------------------------------ (4) invalid combinations
def test_critic_kind_and_rank_are_checked_when_the_config_loads():
    with pytest.raises(ValueError, match=r"objective.critic: 'lora_shared' is not one of \['full', 'lora', "
                                         r"'shared_base'\]"):
        load_config("configs/dmd2_gmm.yaml", ["objective.critic=lora_shared"])
    with pytest.raises(ValueError, match="objective.critic_lora_rank must be >= 1, got 0"):
        load_config("configs/dmd2_gmm.yaml", ["objective.critic=shared_base", "objective.critic_lora_rank=0"])


def test_shared_base_needs_a_network_teacher():
    cfg = load_config("configs/dmd2_gmm.yaml", ["teacher.backbone_hidden=32", "objective.critic_lora_rank=4",
                                                "objective.critic=shared_base"])
    with pytest.raises(ValueError, match="GMMTeacher teacher has none: use a full or lora critic"):
        build_objective(cfg, "cpu")


# ------------------------------------------------------------------ trainer: optimizer groups and resume
def trainer(out, steps: int, resume: bool = False, seed: int = 0) -> Trainer:
    cfg = load_config("configs/dmd2_gmm.yaml", [
        f"train.output_dir={out}", f"train.max_steps={steps}", "train.checkpoint_every=2", "train.batch_size=32",
        "train.progress=false", "train.num_validation_samples=16", "train.lr_scheduler=constant",
        "objective.critic_lora_rank=4", "objective.critic=shared_base", "objective.real_data=mixture",
        *(["train.resume=latest"] if resume else [])])
    return Trainer(cfg, mlp_objective(seed=seed))


def test_trainer_optimizes_only_the_adapters_and_resumes_bitwise(tmp_path):
    straight = trainer(tmp_path / "a", 4)
    critic_opt = straight.optimizers["critic"]
    in_opt = {id(p) for g in critic_opt.param_groups for p in g["params"]}
    expected = {id(p) for p in lora_params(straight.objective).values()} | \
        {id(p) for p in straight.objective.critic.head.parameters()}
    assert in_opt == expected
    straight.train()
    trainer(tmp_path / "b", 2).train()
    resumed = trainer(tmp_path / "b", 4, resume=True, seed=7)  # other weights everywhere until the checkpoint loads
    assert not torch.equal(resumed.objective.teacher.predict(*probe(resumed.objective.teacher), 2.0).x0,
                           MLPTeacher(0).predict(*probe(resumed.objective.teacher), 2.0).x0)
    resumed.train()
    a, b = straight.objective.state_dict(), resumed.objective.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x_t, t, cond = probe(resumed.objective.teacher)
    want = MLPTeacher(0).predict(x_t, t, cond, 2.0).x0
    assert torch.equal(resumed.objective.teacher.predict(x_t, t, cond, 2.0).x0, want)
    assert not torch.equal(resumed.objective.critic(x_t, t, cond.fields)[0],
                           MLPTeacher(0).model_output(x_t, t, cond.fields))


# ------------------------------------------------------------------ a real diffusers UNet (peft via add_adapter)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_sd_unet_shares_its_base_with_the_critic(dtype):
    from stepdistill.perf.arch import build_teacher

    teacher = build_teacher("tiny-sd", "cpu", dtype)
    unet = teacher.backbone
    cond = teacher.encode(["a cat", "a dog"])
    x_t = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100.0, 700.0])
    before = teacher.predict(x_t, t, cond, 3.0).x0
    obj = DMD2(teacher, build_student(teacher, StudentConfig()), ConditionSource(teacher, ["a cat", "a dog"]),
               DMD2Config(critic_lora_rank=4, critic="shared_base"))
    assert obj.critic.fake_score is unet and teacher.pipe.unet is teacher.backbone
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())  # fp32 on a bf16 base
    assert all(p.dtype == dtype and not p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(lora.values(), lr=1e-2)
    for step in range(2):
        obj.loss("critic", {"cond_index": torch.tensor([0, 1])}, step)["loss"].backward()
        assert all(p.grad is None for n, p in unet.named_parameters() if "lora_" not in n)
        opt.step()
        opt.zero_grad()
    assert torch.equal(teacher.predict(x_t, t, cond, 3.0).x0, before)
    assert (obj.critic(x_t, t, cond.fields)[0] - teacher.model_output(x_t, t, cond.fields)).abs().max() > 1e-3
