"""eval/speed.py's tiny preset end to end (output structure, not speed) and the memory planner against measured
allocations of tiny configs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.perf import speed
from stepdistill.perf.arch import build_teacher
from stepdistill.perf.memory import build_meta_objective, count_saved, estimate, storage_bytes
from stepdistill.perf.speed import PRESETS, bench_config
from stepdistill.training import Trainer

ROOT = Path(__file__).resolve().parents[1]


def test_speed_tiny_preset_writes_json_and_table(tmp_path):
    out = tmp_path / "speed"
    env = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(ROOT / "eval/speed.py"), "--preset", "tiny", "--out", str(out),
                    "--objectives", "dmd2", "lcm", "regression"], check=True, cwd=ROOT, env=env, timeout=600,
                   capture_output=True)
    result = json.loads((out / "speed.json").read_text())
    assert result["errors"] == [] and result["skipped"] == []
    assert result["device"]["name"] == "cpu"
    rows = {(r["objective"], r["model"], r["option"]) for r in result["training"]}
    expected = {(o, m, PRESETS["tiny"].train_options[m][0]) for o in ("dmd2", "lcm", "regression")
                for m in PRESETS["tiny"].models} | {("dmd2", "tiny-sd", "channels_last")}
    assert rows == expected
    for r in result["training"]:
        assert r["samples_per_s"] > 0
        kinds = {s["phases"] for s in r["steps"]}
        assert kinds == ({"generator+critic", "critic"} if r["objective"] == "dmd2" else {"generator"})
        assert abs(sum(s["share_of_steps"] for s in r["steps"]) - 1) < 1e-9
        for s in r["steps"]:
            assert s["tflop_per_step"] > 0 and s["mfu"] is None  # no datasheet peak for a CPU
            assert s["forward_s"]["generator"] > 0
        if r["objective"] == "dmd2":  # the critic-only step runs the fake score, not the generator with grad
            critic_step = next(s for s in r["steps"] if s["phases"] == "critic")
            assert critic_step["forward_s"]["critic"] > 0 and critic_step["forward_s"]["teacher"] == 0
            both = next(s for s in r["steps"] if s["phases"] == "generator+critic")
            assert both["tflop_per_step"] > critic_step["tflop_per_step"]
    samplers = {(r["model"], r["steps"]) for r in result["sampling"]}
    assert samplers == {(m, k) for m in PRESETS["tiny"].models for k in (1, *PRESETS["tiny"].teacher_steps)}
    table = (out / "speed.md").read_text()
    assert table.startswith("Device: **cpu**") and "| dmd2 | tiny-sd | 2 | bf16 |" in table


def measured_memory(objective_name: str, model: str, batch: int, tmp_path) -> dict:
    """Bytes of a real tiny training run on CPU (fp32): all weights, the largest group's gradients, AdamW
    states after a step, and the largest phase's activations (storages autograd saves in objective.loss)."""
    device = torch.device("cpu")
    cfg = bench_config(objective_name, model, batch, "bf16", device, str(tmp_path))
    cfg.teacher.dtype = "fp32"
    from stepdistill.data import DEFAULT_PROMPTS
    from stepdistill.objectives import build_objective

    teacher = build_teacher(model, device, torch.float32)
    objective = build_objective(cfg, device, teacher=teacher, prompts=DEFAULT_PROMPTS)
    trainer = Trainer(cfg, objective)
    batch_data = next(trainer.batches())
    groups = {g.name: g for g in objective.optimizer_groups()}
    activations, grads = 0, 0
    for phase in groups:
        with count_saved([objective, teacher.backbone]) as seen:
            loss = objective.loss(phase, batch_data, 0)["loss"]
        activations = max(activations, sum(seen.values()))
        loss.backward()
        grads = max(grads, storage_bytes(p.grad for p in objective.parameters() if p.grad is not None))
        for opt in trainer.optimizers.values():
            opt.zero_grad(set_to_none=True)
    trainer.train_step(batch_data)
    states = storage_bytes(v for opt in trainer.optimizers.values() for s in opt.state.values()
                           for v in s.values() if v.ndim > 0)
    pipe_modules = [m for m in teacher.pipe.components.values() if isinstance(m, torch.nn.Module)]
    weights = storage_bytes(t for m in [objective, *pipe_modules] for t in m.parameters())
    return {"weights": weights, "grads": grads, "optimizer": states, "activations": activations, "cfg": cfg}


@pytest.mark.parametrize("objective_name", ["dmd2", "lcm", "regression"])
def test_plan_estimate_matches_measured_tiny_allocations(objective_name, tmp_path):
    measured = measured_memory(objective_name, "tiny-sd", 4, tmp_path)
    cfg = measured.pop("cfg")
    cfg.teacher.dtype = "fp32"
    est = estimate(build_meta_objective(cfg, "tiny-sd"), 4, mixed_precision="no")
    for key, value in measured.items():
        assert abs(getattr(est, key) - value) <= 0.15 * value, (key, getattr(est, key), value)


def test_plan_recommends_options_that_fit(tmp_path):
    from stepdistill.perf.memory import plan

    cfg = load_config(str(ROOT / "configs/dmd2_sd15.yaml"), ["train.batch_size=2", "train.gradient_checkpointing=false"])
    tight = plan(cfg, gpu_gib=0.03, model="tiny-sd", bitsandbytes=False)
    rows = tight["estimates"]
    assert rows[0]["option"] == "as configured" and not rows[0]["fits"]
    assert tight["recommendation"] == next((r["option"] for r in rows if r["fits"]), "does not fit: lower train.batch_size")
    roomy = plan(cfg, gpu_gib=80, model="tiny-sd", bitsandbytes=False)
    assert roomy["recommendation"] == "as configured" and len(roomy["estimates"]) == 1


def test_bench_options_are_the_users_config_keys(tmp_path):
    """Each measured option is a config override the trainer acts on (no hacks on built objects)."""
    assert not hasattr(speed, "apply_option")
    assert PRESETS["h100"].train_options["sd15"][-1] == "compile"
    cpu = torch.device("cpu")
    train = {o: bench_config("dmd2", "tiny-sd", 2, o, cpu, str(tmp_path)).train
             for o in ("bf16", "fused_adamw", "channels_last", "compile", "grad_ckpt")}
    assert (train["bf16"].optimizer, train["bf16"].channels_last, train["bf16"].compile) == ("adamw", False, False)
    assert train["fused_adamw"].optimizer == "adamw_fused" and train["channels_last"].channels_last
    assert train["compile"].compile and train["grad_ckpt"].gradient_checkpointing
    assert not train["bf16"].gradient_checkpointing
    both = bench_config("dmd2", "tiny-sdxl", 2, "grad_ckpt+lora", cpu, str(tmp_path))
    assert both.student.kind == "lora" and both.train.gradient_checkpointing
    for preset in PRESETS.values():
        for options in preset.train_options.values():
            for option in options:
                speed.option_overrides(option)  # every preset option maps to config keys
    with pytest.raises(ValueError, match="benchmark option 'fast' is not one of"):
        speed.option_overrides("grad_ckpt+fast")


def test_plan_counts_optimizer_state_bytes_by_optimizer():
    cfg = load_config(str(ROOT / "configs/dmd2_sd15.yaml"), ["train.batch_size=2"])
    est = {o: estimate(build_meta_objective(cfg, "tiny-sd"), 2, optimizer=o)
           for o in ("adamw", "adamw_fused", "adamw_8bit")}
    trainable = sum(est["adamw"].options["trainable_params"].values())
    assert est["adamw"].optimizer == 8 * trainable == est["adamw_fused"].optimizer
    assert est["adamw_8bit"].optimizer * 4 == est["adamw"].optimizer
    for key in ("weights", "grads", "activations"):
        assert getattr(est["adamw_8bit"], key) == getattr(est["adamw"], key)


def test_plan_recommends_8bit_adamw_where_it_makes_the_run_fit():
    from stepdistill.perf.memory import HEADROOM, GiB, plan

    cfg = load_config(str(ROOT / "configs/dmd2_sd15.yaml"),
                      ["train.batch_size=2", "train.gradient_checkpointing=false"])
    ckpt = estimate(build_meta_objective(cfg, "tiny-sd"), 2, gradient_checkpointing=True)
    ckpt_8bit = estimate(build_meta_objective(cfg, "tiny-sd"), 2, gradient_checkpointing=True, optimizer="adamw_8bit")
    gpu_gib = (ckpt.total + ckpt_8bit.total) / 2 / HEADROOM / GiB  # fits with 8-bit states, not without
    for installed, name in ((True, "gradient checkpointing + 8-bit AdamW"),
                            (False, "gradient checkpointing + 8-bit AdamW (needs pip install bitsandbytes)")):
        result = plan(cfg, gpu_gib=gpu_gib, model="tiny-sd", bitsandbytes=installed)
        assert result["recommendation"] == name
        row = result["estimates"][-1]
        assert row["set"] == ["train.gradient_checkpointing=true", "train.optimizer=adamw_8bit"]
        assert row["options"]["optimizer"] == "adamw_8bit"
    configured = plan(load_config(str(ROOT / "configs/dmd2_sd15.yaml"), ["train.batch_size=2",
                                                                         "train.optimizer=adamw_8bit"]),
                      gpu_gib=80, model="tiny-sd", bitsandbytes=False)
    assert configured["estimates"][0]["optimizer"] == round(ckpt_8bit.optimizer / GiB, 3)


def test_plan_offers_the_shared_base_critic_for_dmd2_and_it_drops_the_critic_copy():
    from stepdistill.perf.memory import plan

    cfg = load_config(str(ROOT / "configs/dmd2_sd15.yaml"), ["train.batch_size=2", "objective.critic=lora",
                                                             "objective.critic_lora_rank=4"])
    rows = {r["option"]: r for r in plan(cfg, gpu_gib=1e-6, model="tiny-sd", bitsandbytes=True)["estimates"]}
    shared_row = rows["gradient checkpointing + shared-base LoRA critic"]
    assert shared_row["set"] == ["train.gradient_checkpointing=true", "objective.critic=shared_base",
                                 "objective.critic_lora_rank=4"]
    shared_cfg = load_config(str(ROOT / "configs/dmd2_sd15.yaml"), [
        "train.batch_size=2", "objective.critic_lora_rank=4", "objective.critic=shared_base"])
    copy_objective = build_meta_objective(cfg, "tiny-sd")
    copy = estimate(copy_objective, 2, gradient_checkpointing=True)
    shared = estimate(build_meta_objective(shared_cfg, "tiny-sd"), 2, gradient_checkpointing=True)
    critic_base = storage_bytes(p for n, p in copy_objective.critic.fake_score.named_parameters() if "lora_" not in n)
    assert critic_base > 0 and shared.weights == pytest.approx(copy.weights - critic_base, rel=1e-3)
    full_critic = load_config(str(ROOT / "configs/dmd2_sd15.yaml"), ["train.batch_size=2"])
    rung = {r["option"]: r for r in plan(full_critic, gpu_gib=1e-6, model="tiny-sd")["estimates"]}
    assert "objective.critic_lora_rank=64" in rung["gradient checkpointing + shared-base LoRA critic"]["set"]
    assert not any("shared-base" in r["option"] for r in plan(shared_cfg, gpu_gib=1e-6, model="tiny-sd")["estimates"])


def test_plan_teacher_offload_rung_drops_exactly_the_teacher_backbone():
    from stepdistill.perf.memory import HEADROOM, GiB, plan

    def cfg_of(path: str, *extra: str):
        return load_config(str(ROOT / path), ["train.batch_size=2", "train.gradient_checkpointing=false", *extra])

    cfg = cfg_of("configs/dmd2_sd15.yaml")
    objective = build_meta_objective(cfg, "tiny-sd")
    kept = estimate(objective, 2, gradient_checkpointing=True, optimizer="adamw_8bit")
    offloaded = estimate(objective, 2, gradient_checkpointing=True, optimizer="adamw_8bit", teacher_offload=True)
    teacher_bytes = storage_bytes(objective.teacher.backbone.parameters())
    assert teacher_bytes > 0 and offloaded.weights == kept.weights - teacher_bytes
    assert offloaded.by_module["teacher.backbone"] == 0
    for key in ("grads", "optimizer", "activations"):
        assert getattr(offloaded, key) == getattr(kept, key)
    gpu_gib = (kept.total + offloaded.total) / 2 / HEADROOM / GiB  # fits with the teacher offloaded, not without
    result = plan(cfg, gpu_gib=gpu_gib, model="tiny-sd", bitsandbytes=True)
    assert result["recommendation"] == "gradient checkpointing + 8-bit AdamW + teacher offload"
    row = result["estimates"][-1]
    assert row["set"] == ["train.gradient_checkpointing=true", "train.optimizer=adamw_8bit", "teacher.offload=true"]
    assert row["options"]["teacher_offload"] and row["by_module"]["teacher.backbone"] == 0
    configured = plan(cfg_of("configs/dmd2_sd15.yaml", "teacher.offload=true"), gpu_gib=80, model="tiny-sd")
    assert configured["estimates"][0]["by_module"]["teacher.backbone"] == 0  # "as configured" counts it

    shared = [cfg_of("configs/dmd2_sd15.yaml", "objective.critic_lora_rank=4", "objective.critic=shared_base"),
              cfg_of("configs/lcm_lora_sdxl.yaml")]  # teacher_net: lora_base
    for c in shared:  # the teacher's backbone is a trained network's base: no rung, and the estimate refuses it
        assert not any("offload" in r["option"] for r in plan(c, gpu_gib=1e-6, model="tiny-sd")["estimates"])
        with pytest.raises(ValueError, match="shared with a trained network"):
            estimate(build_meta_objective(c, "tiny-sd"), 2, teacher_offload=True)


def test_cli_plan_prints_the_plan_and_bench_knows_the_bench_objectives(capsys):
    from stepdistill.cli import main
    from stepdistill.perf.speed import OBJECTIVE_CONFIGS

    assert main(["plan", "--json", "--config", str(ROOT / "configs/dmd2_sd15.yaml"), "--model", "tiny-sd", "--gpu-gib", "80",
                 "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["gpu_gib"] == 80 and result["recommendation"] == "as configured"
    assert result["estimates"][0]["options"]["batch_size"] == 2
    with pytest.raises(SystemExit):
        main(["bench", "--objectives", "boot"])  # argparse refuses an objective the bench does not know
    assert sorted(OBJECTIVE_CONFIGS) == ["dmd2", "lcm", "regression"] and sorted(PRESETS) == ["h100", "tiny"]
