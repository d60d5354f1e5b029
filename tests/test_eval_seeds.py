"""eval/eval_seeds.py's table: the mean and spread over evaluation seeds, and the paired difference from the anchor
(the same seeds' prompts and noise), which is what decides a close call against the teacher's 4-step samples."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("eval_seeds", ROOT / "eval" / "eval_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_reports_paired_differences_from_the_anchor():
    script = load_script()
    rows = {"teacher 4-step": {"fid_vs_teacher50": [8.0, 14.0], "fid_vs_real": [90.0, 92.0],
                               "prompt_accuracy": [1.0, 1.0]},
            "student": {"fid_vs_teacher50": [7.0, 16.0], "fid_vs_real": [60.0, 64.0], "prompt_accuracy": [1.0, 0.9]}}
    lines = script.table(rows, [2000, 2001], "teacher 4-step").splitlines()
    student = next(line for line in lines if line.startswith("| student"))
    cells = [c.strip() for c in student.strip("|").split("|")]
    assert cells[1] == "11.50 +- 6.36"  # mean and sample sd of 7 and 16
    assert cells[2] == "7.00 / 16.00"
    assert cells[3] == "+0.50"  # ((7 - 8) + (16 - 14)) / 2
    assert cells[4] == "62.00 +- 2.83" and cells[5] == "0.950"
    anchor = next(line for line in lines if line.startswith("| teacher 4-step"))
    assert "| +0.00 |" in anchor


def test_one_seed_has_no_spread():
    assert load_script().mean_sd([8.63]) == "8.63"
