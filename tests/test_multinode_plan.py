"""Multi-node: `stepdistill plan --num-gpus N`, the per-GPU estimate under FSDP full shard over N GPUs
(docs/SCALING.md quotes it for 8 and 16 GPUs): the trainable state divides by N, the frozen teacher does not; the
2-node accelerate config is the one-node FSDP config on 16 processes."""
from pathlib import Path

from stepdistill.config import load_config
from stepdistill.perf.memory import plan

REPO = Path(__file__).resolve().parents[1]


def test_num_gpus_divides_the_trainable_state_and_not_the_teacher():
    cfg = load_config("dmd2_sd15", ["train.batch_size=1", "train.gradient_checkpointing=true"])
    one, sixteen = (plan(cfg, 1000.0, "tiny-sd", bitsandbytes=False, num_gpus=n) for n in (1, 16))
    assert (one["num_gpus"], sixteen["num_gpus"]) == (1, 16)
    one, sixteen = one["estimates"][0], sixteen["estimates"][0]
    assert one["option"] == sixteen["option"] == "as configured" and sixteen["options"]["fsdp_shards"] == 16
    for part in ("grads", "optimizer"):  # GiB rounded to 3 decimals
        assert abs(sixteen[part] * 16 - one[part]) <= 16 * 0.0005 + 1e-9 and sixteen[part] < one[part]
    assert one["by_module"]["teacher.backbone"] == sixteen["by_module"]["teacher.backbone"] > 0


def test_two_node_config_is_the_one_node_fsdp_config_on_16_processes():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = REPO / "configs" / "accelerate"
    one, two = (load_config_from_file(str(configs / name)) for name in ("fsdp.yaml", "fsdp_2x8.yaml"))
    assert (two.num_machines, two.num_processes, two.machine_rank) == (2, 16, 0)
    assert two.main_process_ip and two.main_process_port and two.distributed_type == one.distributed_type
    assert two.fsdp_config == one.fsdp_config and two.mixed_precision == one.mixed_precision
