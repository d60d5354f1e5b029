"""The accelerate boundary: a 2-process CPU (gloo) run of DMD2 and of consistency distillation gives the weights of
one process on the same global batch. The one-process reference runs each step's phases on both ranks' halves of
the batch, each half with its rank's random stream, and averages their gradients (what DDP's all-reduce does), so a
module that bypassed its DDP wrapper (no gradient sync) or a rank-dependent slip would break the equality."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed
from reliability_utils import tiny_tree
from safetensors.torch import load_file

from stepdistill.config import config_from_dict
from stepdistill.objectives import build_objective
from stepdistill.objectives.base import get_module
from stepdistill.training.trainer import step_seed

REPO = Path(__file__).resolve().parents[1]
STEPS, HALF_BATCH = 6, 16
OBJECTIVES = {
    "dmd2": {"name": "dmd2", "generator_lr": 1e-3, "critic_lr": 1e-3, "critic_updates": 2, "real_guidance": 1.0,
             "weight_decay": 0.01},
    "consistency": {"name": "consistency", "lr": 1e-3, "target": "ema", "ema_decay": 0.9, "loss": "l2"},
}

RANK_SCRIPT = '''
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_multiprocess import tree
from stepdistill.config import config_from_dict
from stepdistill.training import Trainer

for name in ("dmd2", "consistency"):
    Trainer(config_from_dict(tree(name, f"{sys.argv[1]}/{name}"))).train()
'''


def tree(name: str, out) -> dict:
    t = tiny_tree(out, max_steps=STEPS, batch_size=HALF_BATCH, checkpoint_every=STEPS, ema_decay=0.0,
                  lr_scheduler="constant", lr_warmup_steps=0)
    t["objective"] = dict(OBJECTIVES[name])
    return t


def one_process_reference(name: str, out, run: dict | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The same run in one process (`run`: its config tree, else `tree(name, out)`): per step and phase, both
    ranks' losses (their own RNG streams), gradients averaged, clipped, one optimizer step."""
    cfg = config_from_dict(run or tree(name, out))
    set_seed(cfg.train.seed)
    objective = build_objective(cfg)
    objective.prepare_data(out, "cpu")
    groups = {g.name: g for g in objective.optimizer_groups()}
    params = {n: [p for p in get_module(objective, g.module).parameters() if p.requires_grad]
              for n, g in groups.items()}
    optimizers = {n: torch.optim.AdamW(params[n], lr=g.lr, betas=g.betas, eps=g.eps, weight_decay=g.weight_decay)
                  for n, g in groups.items()}
    batch = {"cond_index": torch.zeros(HALF_BATCH, dtype=torch.long)}  # the unconditional ring: labels unused
    for step in range(STEPS):
        streams = {}
        for rank in (0, 1):
            torch.manual_seed(step_seed(cfg.train.seed, step, rank))
            streams[rank] = torch.get_rng_state()
        for phase in objective.phases(step):
            for rank in (0, 1):
                torch.set_rng_state(streams[rank])
                (objective.loss(phase, batch, step)["loss"] / 2).backward()
                streams[rank] = torch.get_rng_state()
            torch.nn.utils.clip_grad_norm_(params[phase], groups[phase].max_grad_norm)
            optimizers[phase].step()
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            objective.after_step(phase, step)
    return {g.name: {k: v.detach().clone() for k, v in get_module(objective, g.module).state_dict().items()}
            for g in groups.values()}


def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(script), str(tmp_path / "ddp"), str(REPO / "tests")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(1)
    for name in OBJECTIVES:
        reference = one_process_reference(name, tmp_path / f"ref-{name}")
        folder = tmp_path / "ddp" / name / "checkpoints" / f"checkpoint-{STEPS}"
        files = ["model.safetensors", "model_1.safetensors"][:len(reference)]
        for group, file in zip(reference, files):
            ddp = load_file(str(folder / file))
            assert ddp.keys() == reference[group].keys(), (name, group)
            for key, value in ddp.items():
                torch.testing.assert_close(value, reference[group][key], atol=2e-5, rtol=1e-4,
                                           msg=f"{name} {group} {key}")
        set_seed(0)  # and training moved the weights away from the start, so the equality is not trivial
        fresh = build_objective(config_from_dict(tree(name, tmp_path / f"fresh-{name}"))).generator.backbone
        assert any(not torch.allclose(v, reference["generator"][k]) for k, v in fresh.state_dict().items())
