"""A run's checkpoints as the trainer writes and reads them: accelerate's state (sharded under FSDP), the EMA, the
objective's extra modules and the trainer state, written atomically after a check that no weight is NaN/inf; the
folder handling itself (temporary folder, rename, pruning, verification) is checkpoint.py's."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from stepdistill.errors import RunFailed
from stepdistill.training import accel, checkpoint
from stepdistill.training.ema import EMA_FILE, EMA_SHARDS
from stepdistill.training.step import NonFiniteError

if TYPE_CHECKING:
    from stepdistill.training.trainer import Trainer


def check_weights_finite(trainer: Trainer) -> None:
    """Refuse to checkpoint NaN/inf weights or EMA (every process decides alike)."""
    bad = [name for name, p in trainer.runner.trainable() if not torch.isfinite(accel.local(p)).all()]
    if trainer.ema is not None and not trainer.ema.all_finite():
        bad.append("EMA")
    if not accel.all_ranks(trainer.accelerator, not bad, "all"):  # shards differ: every process decides alike
        bad = bad or ["a shard on another process"]
        last = checkpoint.list_checkpoints(trainer.output_dir)
        raise NonFiniteError(f"step {trainer.step}: non-finite weights in {', '.join(bad[:3])}; no checkpoint was "
                             "written. Resume from the last complete checkpoint "
                             f"({last[-1] if last else 'none'}) with a lower learning rate")


def save_checkpoint(trainer: Trainer) -> Path:
    """Everything a resume needs, written atomically; weights are checked first, so a checkpoint never holds
    NaN/inf."""
    acc = trainer.accelerator
    check_weights_finite(trainer)
    tmp = trainer.output_dir / "checkpoints" / f"{checkpoint.TMP_PREFIX}{trainer.step}"
    if acc.is_main_process:
        checkpoint.begin_checkpoint(trainer.output_dir, trainer.step)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
        if trainer.ema is not None and trainer.ema.sharded:
            trainer.ema.save_sharded(tmp / EMA_SHARDS)
        acc.wait_for_everyone()
        final = tmp.with_name(f"{checkpoint.CHECKPOINT_PREFIX}{trainer.step}")
        if acc.is_main_process:
            _write_own_state(trainer, tmp)
            final = checkpoint.finish_checkpoint(tmp, trainer.step, trainer.cfg.train.checkpoints_limit,
                                                 trainer.config_hash)
    except Exception as e:  # a full disk, say (torch reports it as a failed zip write): say so, free the space
        free = shutil.disk_usage(tmp.parent).free / 2**20
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailed(f"writing checkpoint-{trainer.step} into {tmp.parent} failed ({str(e).splitlines()[0]}) "
                        f"with {free:.1f} MiB free on that disk: free space, or choose another "
                        "train.output_dir") from e
    except BaseException:  # an abort: the partial folder goes
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc.wait_for_everyone()
    return final


def _write_own_state(trainer: Trainer, tmp: Path) -> None:
    """What accelerate does not save: the EMA, the objective's extra modules, the trainer state (last: it marks
    the checkpoint complete), then the hooks."""
    sharded = accel.is_sharded(trainer.accelerator)  # then accelerate saved the objective's modules with the rest
    if trainer.ema is not None and not trainer.ema.sharded:
        trainer.ema.save(tmp / EMA_FILE)
    for i, module in enumerate([] if sharded else trainer.objective.checkpoint_modules()):
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                  str(tmp / checkpoint.OBJECTIVE_STATE.format(i)))
    checkpoint.write_trainer_state(tmp, {"step": trainer.step, "skipped_steps": trainer.skipped_steps,
                                         "config_hash": trainer.config_hash, "config": trainer.identity,
                                         "num_processes": trainer.accelerator.num_processes, "sharded": sharded})
    for hook in trainer.hooks:
        hook.on_checkpoint_written(trainer, tmp)


def load_checkpoint(trainer: Trainer, path: Path) -> None:
    """Restore everything save_checkpoint wrote."""
    sharded = accel.is_sharded(trainer.accelerator)
    state = checkpoint.load_accelerate_state(trainer.accelerator, path)
    trainer.step, trainer.runner.skipped_steps = state["step"], state["skipped_steps"]
    if trainer.ema is not None:
        trainer.ema.load_sharded(path / EMA_SHARDS) if trainer.ema.sharded else trainer.ema.load(path / EMA_FILE)
    for i, module in enumerate([] if sharded else trainer.objective.checkpoint_modules()):
        module.load_state_dict(load_file(str(path / checkpoint.OBJECTIVE_STATE.format(i))))
