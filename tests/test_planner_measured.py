"""The live-tensor memory measurement (stepdistill.perf.measure) on known allocations, and the memory planner held
within 15% of the peak it measures over real training steps of tiny pipelines (every phase, optimizer states
included), for the configurations the full-size table checks at SD scale."""
import pytest
import torch

from stepdistill.data import DEFAULT_PROMPTS
from stepdistill.objectives import build_objective
from stepdistill.perf.arch import build_teacher
from stepdistill.perf.measure import LiveTensorMemory, measure_training
from stepdistill.perf.memory import build_meta_objective, estimate, with_overrides
from stepdistill.perf.speed import bench_config
from stepdistill.training import Trainer

MiB = 2**20


def test_live_tensor_memory_counts_allocations_views_and_frees():
    kept = torch.zeros(MiB // 4)  # 1 MiB, alive on entry
    with LiveTensorMemory(alive=[kept]) as m:
        assert m.current == MiB
        a = torch.ones(MiB // 2)  # +2 MiB
        view = a[: MiB // 8]  # a view: no new storage
        assert m.current == 3 * MiB
        del a
        assert m.current == 3 * MiB  # the view keeps the storage alive
        del view
        assert m.current == MiB
        torch.ones(MiB // 8)  # 0.5 MiB, freed at once
    assert m.peak == 3 * MiB


def test_live_tensor_memory_sees_backward_and_optimizer_state():
    layer = torch.nn.Linear(256, 256)
    n = sum(p.numel() for p in layer.parameters())
    opt = torch.optim.AdamW(layer.parameters())
    with LiveTensorMemory(alive=list(layer.parameters())) as m:
        layer(torch.randn(1, 256)).sum().backward()
        opt.step()
        after = m.current
    assert after >= 16 * n  # weights, gradients and AdamW's two moments (plus the last step's small leftovers)
    assert after < 16 * n + 64 * 1024


@pytest.mark.parametrize("foreach", [False, True])
def test_planner_models_the_adamw_step_temporaries(foreach):
    from stepdistill.perf.memory import optimizer_step_transient

    net = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 256))
    sizes = [p.numel() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), foreach=foreach)
    net(torch.randn(2, 512)).sum().backward()
    opt.step()
    held = [*net.parameters(), *(p.grad for p in net.parameters()), *(v for s in opt.state.values() for v in s.values())]
    with LiveTensorMemory(alive=held) as m:
        before = m.current
        opt.step()
    modeled = optimizer_step_transient("adamw", sizes, "cuda" if foreach else "cpu")  # foreach is torch's CUDA path
    assert abs((m.peak - before) - modeled) <= 0.15 * modeled, (m.peak - before, modeled)


CONFIGS = {  # name: (bench objective, tiny model, overrides)
    "dmd2 full": ("dmd2", "tiny-sd", []),
    "dmd2 LoRA generator + shared-base critic": ("dmd2", "tiny-sd",
                                                 ["student.kind=lora", "objective.critic=shared_base"]),
    "dmd2 sdxl LoRA generator": ("dmd2", "tiny-sdxl", ["student.kind=lora"]),
    "dmd2 with EMA": ("dmd2", "tiny-sd", ["train.ema_decay=0.99"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_planner_within_15_percent_of_the_measured_peak(name, tmp_path):
    objective_name, model, overrides = CONFIGS[name]
    cpu = torch.device("cpu")
    cfg = bench_config(objective_name, model, 4, "bf16", cpu, str(tmp_path))
    cfg = with_overrides(cfg, [*overrides, "teacher.dtype=fp32", "train.mixed_precision='no'"]
                         + (["objective.critic_updates=2"] if objective_name == "dmd2" else []))
    torch.manual_seed(0)
    objective = build_objective(cfg, cpu, teacher=build_teacher(model, cpu, torch.float32), prompts=DEFAULT_PROMPTS)
    trainer = Trainer(cfg, objective)
    measured = measure_training(trainer, 3)  # every phase twice where there are two, optimizer states created
    est = estimate(build_meta_objective(cfg, model), 4, "no", optimizer=cfg.train.optimizer,
                   ema=cfg.train.ema_decay > 0, device_type="cpu")
    assert abs(est.total - measured) <= 0.15 * measured, (name, est.as_dict(), measured / 2**30)
