"""eval/benchmark.py's pieces that need no training: every method's config is valid, and the digits section of
BENCHMARKS.md is replaced without touching the rest of the file."""
import importlib.util
from pathlib import Path

import pytest

from stepdistill.config import load_config, load_config_tree
from stepdistill.evaluation.miniature import markdown_table
from stepdistill.miniature.demo import asset_overrides
from stepdistill.recipes import plan_stages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("digits_benchmark", ROOT / "eval" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_config_loads_with_its_own_objective(bench, tmp_path):
    names = set()
    for method in bench.METHODS:
        if "recipe" in bench.METHODS[method]:  # a shipped recipe: its stages are valid and the rows name them
            stages = plan_stages(load_config_tree(bench.METHODS[method]["recipe"], asset_overrides()))
            assert set(bench.METHODS[method]["rows"]) <= {s.name for s in stages}
            continue
        cfg = load_config(bench.method_config(method, tmp_path, tmp_path / "real_digits"), asset_overrides())
        names.add(cfg.objective.name)
        # the shared budget; BOOT's student samples at the signal ODE's clean end t = 0
        assert cfg.student.timesteps == ([0] if cfg.objective.name == "boot" else [999])
        assert cfg.train.batch_size == 32
    gan = load_config(bench.method_config("DMD2 + GAN on real digits", tmp_path, tmp_path / "real_digits"))
    assert gan.objective.real_data == "images" and gan.data.image_dir == str(tmp_path / "real_digits")
    assert names == {"regression", "consistency", "dmd2", "boot", "vsd", "sid"}


def test_section_is_replaced_and_the_rest_kept(bench, tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n## Speed\nGPU table\n")
    bench.write_section(markdown, "## Digits\nfirst")
    bench.write_section(markdown, "## Digits\nsecond")
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\n## Speed\nGPU table\n") and "second" in text and "first" not in text
    assert text.count(bench.SECTION_START) == 1


def test_table_extra_columns_line_up():
    row = {"steps": 1, "guidance_scale": 0.0, "prompt_accuracy": 0.9, "fid_vs_teacher50": 10.0, "fid_vs_real": 20.0,
           "images_per_s": 100.0, "train_seconds": 12.5}
    table = markdown_table({"student": row}, {"teacher_floor": 4.0, "real_floor": 12.0}, {"train s": "train_seconds"})
    lines = table.splitlines()
    assert {line.count("|") for line in lines} == {9} and lines[2].endswith("| 12.5 |")


def test_every_recipe_row_plans_valid_stages(bench, tmp_path):
    """The multi-student and smaller-student rows (docs/MSD.md) are recipes over the demo config."""
    from stepdistill.recipes import plan_stages

    stages = {name: [s.name for s in plan_stages(bench.recipe_tree(name, tmp_path, tmp_path / "real", 300))]
              for name in bench.RECIPES}
    assert stages["MSD, 5 students (DMD2, same total updates)"] == [f"student-{k}" for k in range(5)] + ["routed"]
    assert stages["half-width student, TSM then DMD2"] == ["tsm", "dmd2"]
    assert stages["half-width student, DMD2 (no TSM)"] == ["dmd2"]


def test_a_run_of_some_methods_keeps_the_other_rows_in_method_order(bench):
    """`--methods` reruns a few rows; the table keeps every other row of <out>/benchmark.json, teachers first, and a
    preset recipe's stage rows (whose method name itself holds ': ') stay with their method."""
    reflow = next(m for m in bench.METHODS if "recipe" in bench.METHODS[m] and ": " in m)
    previous = {"teacher 1-step DDIM": {"fid": 1}, "DMD2 (no GAN)": {"fid": 2}, f"{reflow}: rf2, 1 Euler steps": {"fid": 3},
                "regression (DMD L_reg / rectified-flow distillation)": {"fid": 4}}
    kept = {name: row for name, row in previous.items() if bench.method_of(name) != reflow}
    merged = bench.merged_rows(kept, {"DMD2 (no GAN)": {"fid": 5}, f"{reflow}: distill": {"fid": 6}})
    assert list(merged) == ["teacher 1-step DDIM", "regression (DMD L_reg / rectified-flow distillation)",
                            "DMD2 (no GAN)", f"{reflow}: distill"]
    assert merged["DMD2 (no GAN)"] == {"fid": 5}
    assert bench.method_of(f"{reflow}: rf2, 1 Euler steps") == reflow
