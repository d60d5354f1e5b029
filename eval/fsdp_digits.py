"""FSDP2 against DDP on the digits teacher, 2 gloo processes on CPU: DMD2 with its GAN head (real digits), consistency
with an EMA target and reflow, each for --steps iterations under `accelerate launch --config_file
configs/accelerate/fsdp_cpu.yaml` and under DDP (`--multi_gpu` with the CPU forced). DDP is the reference: it equals
the one-process run that averages both ranks' gradients at the same global batch (tests/test_multiprocess.py), while
a plain one-process run at that global batch draws other random numbers (each rank seeds its own stream), so its
losses differ by sampling noise and cannot be compared to 1e-4. Reported per objective: the largest difference of
any logged loss (mean over both ranks) over the iterations, the bytes each rank holds for trainable parameters and
AdamW states under FSDP and under DDP (one process's whole copy), the teacher's bytes per rank (replicated), and
whether the FSDP run's export loads with plain diffusers and has the DDP export's files. --mixed-precision bf16
runs the FSDP side in bf16 compute (fp32 master) too and reports its distance from the fp32 run.

    python eval/fsdp_digits.py --out runs/fsdp_digits --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
OBJECTIVES = {
    "dmd2_gan": {"name": "dmd2", "generator_lr": 5e-5, "critic_lr": 1e-3, "weight_decay": 0.0, "critic_updates": 2,
                 "real_guidance": 2.0, "real_data": "images", "gan_generator_weight": 2e-2,
                 "gan_critic_weight": 1e-1},
    "consistency": {"name": "consistency", "lr": 1e-5, "target": "ema", "data": "teacher",
                    "pairs": {"num": 64, "steps": 4}},
    "reflow": {"name": "reflow", "lr": 5e-4, "pairs": {"num": 64, "steps": 4, "guidance": 3.0}},
}

RANK_SCRIPT = '''
import json, sys
import torch
from stepdistill.config import config_from_dict
from stepdistill.training import Hook, Trainer
from stepdistill.training.accel import trainable_state_bytes


class LossLog(Hook):
    """Every logged loss of every step, averaged over the processes."""
    def __init__(self):
        self.rows = []

    def on_step_end(self, trainer, logs):
        row = {k: float(trainer.accelerator.reduce(torch.tensor([v]), "mean")) for k, v in sorted(logs.items())
               if not k.startswith("lr/")}
        self.rows.append(row)


for name, config in json.loads(open(sys.argv[1]).read()).items():
    log = LossLog()
    trainer = Trainer(config_from_dict(config), hooks=[log])
    teacher = trainer.objective.teacher.backbone
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(f"{config['train']['output_dir']}/rank{rank}.json", "w") as f:
        json.dump({"losses": log.rows, "trainable_bytes": trainable_state_bytes(trainer.optimizers),
                   "teacher_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters())}, f)
'''


def tree(name: str, out: Path, steps: int, real_digits: Path, mixed_precision: str) -> dict:
    return {
        "objective": OBJECTIVES[name],
        "teacher": {"kind": "sd", "path": "asset:digits_teacher"},
        "student": {"kind": "copy", **({"schedule": "flow"} if name == "reflow" else {"timesteps": [999]})},
        "data": {"prompts_file": "asset:configs/digits_prompts.txt", "image_dir": str(real_digits)},
        "train": {"output_dir": str(out / name), "max_steps": steps, "batch_size": 8, "checkpoint_every": steps,
                  "log_every": steps, "report_to": "none", "num_validation_samples": 4, "device_threads": 1,
                  "ema_decay": 0.0, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                  "mixed_precision": mixed_precision, "progress": False},
    }


def launch(kind: str, trees: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(trees))
    (out / "ranks.py").write_text(RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    how = (["--config_file", str(REPO / "configs/accelerate/fsdp_cpu.yaml")] if kind == "fsdp" else
           ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    cmd = [sys.executable, "-c", DEFAULT_SIGINT, sys.executable, "-m", "accelerate.commands.launch", *how,
           "--num_processes", "2", "--main_process_port", str(port), str(out / "ranks.py"), str(out / "runs.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=3600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (out / "launch.log").write_text(output)
    if proc.returncode != 0:
        raise SystemExit(f"the {kind} launch failed; see {out / 'launch.log'}")


def exports_match(fsdp: Path, ddp: Path) -> tuple[bool, bool]:
    """(the FSDP export loads with diffusers' DiffusionPipeline, it has the DDP export's files)."""
    from diffusers import DiffusionPipeline

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    try:
        DiffusionPipeline.from_pretrained(str(fsdp))
        loads = True
    except Exception:  # noqa: BLE001 - any failure to load is the finding
        loads = False
    return loads, files(fsdp) == files(ddp)


def largest_difference(a: list[dict], b: list[dict]) -> float:
    """The largest difference of any logged loss at any step between two runs' logs."""
    return max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fsdp_digits")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    args = parser.parse_args()
    from stepdistill.miniature import get_dataset

    real = args.out / "real_digits"
    if not real.is_dir():
        get_dataset("digits").write_image_folder(str(real))
    kinds = {"ddp": "no", "fsdp": "no"} | ({"fsdp_bf16": "bf16"} if args.mixed_precision == "bf16" else {})
    for kind, precision in kinds.items():
        trees = {name: tree(name, args.out / kind, args.steps, real, precision) for name in OBJECTIVES}
        if not all((args.out / kind / name / "rank1.json").is_file() for name in OBJECTIVES):  # else: measured
            launch(kind.split("_")[0], trees, args.out / kind)
    report = {}
    for name in OBJECTIVES:
        runs = {kind: [json.loads((args.out / kind / name / f"rank{r}.json").read_text()) for r in (0, 1)]
                for kind in kinds}
        row = {"max_loss_diff_fsdp_vs_ddp": largest_difference(runs["fsdp"][0]["losses"], runs["ddp"][0]["losses"]),
               "iterations": len(runs["fsdp"][0]["losses"]),
               "trainable_bytes_per_rank_fsdp": [r["trainable_bytes"] for r in runs["fsdp"]],
               "trainable_bytes_per_rank_ddp": [r["trainable_bytes"] for r in runs["ddp"]],
               "teacher_bytes_per_rank": runs["fsdp"][0]["teacher_bytes"]}
        if "fsdp_bf16" in runs:
            row["max_loss_diff_bf16_vs_fp32"] = largest_difference(runs["fsdp_bf16"][0]["losses"], runs["fsdp"][0]["losses"])
        row["export_loads"], row["export_same_files"] = exports_match(args.out / "fsdp" / name / "final",
                                                                      args.out / "ddp" / name / "final")
        report[name] = row
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(yaml.safe_dump(report, sort_keys=False))


if __name__ == "__main__":
    main()
