"""eval/fullsize.py on one shipped preset at the real network size (SD1.5, random weights, 64 px): it trains,
stops after a checkpoint, resumes, exports, and the export reloads with plain diffusers and samples at its recipe's
step count. Needs ~8 GiB of memory and several CPU minutes: deselected by default, run with `-m fullsize`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.fullsize
def test_fullsize_preset_trains_resumes_exports_and_reloads(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "eval/fullsize.py"), "presets", "--only", "dmd2_sd15", "--out", str(out),
           "--work", str(tmp_path / "work"), "--timeout-s", "5400"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=6000)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, log[-2000:]
    (row,) = json.loads((out / "presets.json").read_text())
    assert row["status"].startswith("ran"), row
    assert row["checkpoints"] == ["checkpoint-1"] and row["launches"] == 2  # stopped after step 1, then resumed
    assert row["params"]["trainable"] > 0 and row["params"]["frozen"] > 800e6  # SD1.5's 860M UNet at least
    assert row["sample"]["image_size"] == [512, 512]  # the pipeline's default call: SD1.5's native size
    assert row["sample"]["backbone_calls"] == row["sample"]["recipe_steps"] == 1
    assert abs(row["plan_gib"] - row["measured_gib"]) <= 0.15 * row["measured_gib"]
    assert "| dmd2_sd15 |" in (out / "presets.md").read_text()


# ---------------------------------------------------------------------------------------------- options, tiny size
# What the presets meet on a GPU, checked on CPU at tiny size for every family's backbone (the full-size
# observations are in BENCHMARKS.md, "Full-size networks").
FAMILIES = ["sd", "sdxl", "pixart", "sd3"]


def _backbone_step(kind: str, checkpointing: bool, autocast: bool = False, channels_last: bool = False):
    """Output and gradients of one forward/backward of the tiny `kind` backbone (a copy), the bytes autograd saved
    and the dtype the backbone itself returned."""
    import torch

    from stepdistill.perf.arch import build_teacher
    from stepdistill.perf.memory import count_saved

    torch.manual_seed(0)
    teacher = build_teacher(f"tiny-{kind}", "cpu", torch.float32)
    net = teacher.build_backbone().train().requires_grad_(True)
    if checkpointing:
        net.enable_gradient_checkpointing()
    if channels_last:
        net.to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    x = torch.randn(2, *teacher.sample_shape)
    t = torch.tensor([100.0, 700.0]) * (teacher.schedule.num_train_timesteps / 1000)
    fields = teacher.fields_like(2, "cpu")
    raw = []
    net.register_forward_hook(lambda module, args, output: raw.append(output[0] if isinstance(output, tuple)
                                                                      else output.sample))
    with count_saved([net]) as saved, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = teacher.call(net, x, t, fields)
    out.square().mean().backward()
    return out, {n: p.grad for n, p in net.named_parameters()}, sum(saved.values()), raw[0].dtype


@pytest.mark.parametrize("kind", FAMILIES)
def test_gradient_checkpointing_on_every_family_backbone_keeps_gradients_and_saves_less(kind):
    import torch

    _, plain, saved_plain, _ = _backbone_step(kind, checkpointing=False)
    _, ckpt, saved_ckpt, _ = _backbone_step(kind, checkpointing=True)
    assert saved_ckpt < 0.8 * saved_plain, (saved_ckpt, saved_plain)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", FAMILIES)
def test_cpu_bf16_autocast_runs_every_family_backbone_in_bf16_with_fp32_gradients(kind):
    import torch

    out32, _, _, raw32 = _backbone_step(kind, checkpointing=False)
    out16, g16, _, raw16 = _backbone_step(kind, checkpointing=False, autocast=True)
    assert raw32 == torch.float32 and raw16 == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in g16.values() if g is not None)  # fp32 master weights
    rel = (out16 - out32).norm() / out32.norm()
    assert rel < 0.05, rel  # bf16 rounding (8 mantissa bits), not a different function
    assert all(torch.isfinite(g).all() for g in g16.values() if g is not None)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])  # the transformers have no 4-D activations to reorder
def test_channels_last_keeps_the_unet_output_and_gradients(kind):
    import torch

    out, g, _, _ = _backbone_step(kind, checkpointing=False)
    out_cl, g_cl, _, _ = _backbone_step(kind, checkpointing=False, channels_last=True)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    for name in g:
        if g[name] is not None:
            torch.testing.assert_close(g_cl[name], g[name], rtol=1e-3, atol=1e-5, msg=name)


def test_fullsize_presets_command_runs_each_preset_in_a_child(tmp_path):
    """The `presets` command hands each name to a `preset-case` child: an unknown preset comes back as that child's
    own error in its row (the table never hides a preset), not as the parent's argument error."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "eval/fullsize.py"), "presets", "--only", "no_such_preset",
                           "--out", str(out), "--work", str(tmp_path / "work")], check=False, cwd=tmp_path,
                          capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads((out / "presets.json").read_text())
    assert row["status"].startswith("failed") and "no_such_preset" in row["status"], row
    assert "invalid choice" not in row["status"]
    assert "| no_such_preset |" in (out / "presets.md").read_text()


def test_preset_probe_counts_the_trainers_tensors_per_launch_not_the_process(tmp_path):
    """The presets' memory column: each training step's peak is counted from the trainer's own tensors, launch by
    launch, so tensors the process holds beside it (here a 256 MiB ballast; at full size the first launch's
    leftovers) stay out of it, as in the planner check."""
    import torch

    from stepdistill.perf.fullsize import image_folder, small_tree, train_twice
    from stepdistill.teachers.tiny import build_tiny_pipeline

    teacher = tmp_path / "tiny-sd"
    build_tiny_pipeline("sd").save_pretrained(str(teacher))
    tree = small_tree("dmd2_sd15", ["student.kind=lora", "objective.critic=shared_base"], teacher,
                      image_folder(tmp_path), tmp_path / "run")
    ballast = torch.ones(64 * 2**20)  # 256 MiB alive through both launches
    probe, stopped_at = train_twice(tree, tmp_path / "run")
    assert stopped_at == ["checkpoint-1"] and probe.launches == 2 and len(probe.step_s) == 2
    pipeline_bytes = sum(f.stat().st_size for f in teacher.rglob("*.safetensors"))
    for peak in probe.launch_peaks:
        assert pipeline_bytes < peak < ballast.nbytes, (peak, pipeline_bytes)
