"""`stepdistill prompts`: a prompts file for `data.prompts_file` from the captions sources an SD-scale run starts
from (COCO captions JSON, LAION's metadata table with its TEXT column as CSV or Parquet, JSON lines), on tiny files
written here."""
from __future__ import annotations

import csv
import json

import pytest
from cli_utils import assert_fails, run_cli

from stepdistill.config import ConfigError, load_config
from stepdistill.data import read_prompts
from stepdistill.data.captions import write_prompts

CAPTIONS = ["A cat on a  mat.", "a dog\nin the park", "", "A cat on a mat.", "  a red bus  "]
PROMPTS = ["A cat on a mat.", "a dog in the park", "a red bus"]  # one line each, empty and repeats dropped


def test_coco_captions_through_the_cli(tmp_path):
    coco = {"images": [{"id": 7}, {"id": 9}],
            "annotations": [{"id": 10 + i, "image_id": 7 + 2 * (i % 2), "caption": c} for i, c in enumerate(CAPTIONS)]}
    coco["annotations"].reverse()  # in annotation id order whatever the file's order
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco))
    proc = run_cli("prompts", "captions_train2014.json", "--out", "prompts.txt", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"out": "prompts.txt", "prompts": 3, "empty_dropped": 1, "repeats_dropped": 1}
    assert list(read_prompts(tmp_path / "prompts.txt")) == PROMPTS
    cfg = load_config("dmd2_sd15", [f"data.prompts_file={tmp_path / 'prompts.txt'}"])  # what a run then reads
    assert list(read_prompts(cfg.data.prompts_file)) == PROMPTS

    again = run_cli("prompts", "captions_train2014.json", "--out", "prompts.txt", cwd=tmp_path)
    assert_fails(again, 2, "--out prompts.txt exists", "never replaced")
    assert list(read_prompts(tmp_path / "prompts.txt")) == PROMPTS


def test_laion_tables_and_json_lines(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"URL": [f"u{i}" for i in range(5)], "TEXT": CAPTIONS}), tmp_path / "laion.parquet")
    with (tmp_path / "laion.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["URL", "TEXT"], *[[f"u{i}", c] for i, c in enumerate(CAPTIONS)]])
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n" for c in CAPTIONS))
    for source in ("laion.parquet", "laion.csv", "rows.jsonl"):
        out = tmp_path / f"{source}.txt"
        summary = write_prompts(tmp_path / source, out)
        assert list(read_prompts(out)) == PROMPTS and summary["prompts"] == 3, source

    subset = write_prompts(tmp_path / "laion.csv", tmp_path / "two.txt", limit=2, seed=0)
    two = list(read_prompts(tmp_path / "two.txt"))
    assert subset["prompts"] == 2 and len(set(two)) == 2 and two == [p for p in PROMPTS if p in two]  # source order
    write_prompts(tmp_path / "laion.csv", tmp_path / "two_again.txt", limit=2, seed=0)
    assert list(read_prompts(tmp_path / "two_again.txt")) == two

    with pytest.raises(ConfigError, match=r"no column 'caption' \(columns: URL, TEXT\): give --column NAME"):
        write_prompts(tmp_path / "laion.csv", tmp_path / "x.txt", column="caption")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ConfigError, match="not a COCO captions file"):
        write_prompts(tmp_path / "bad.json", tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


def test_a_source_that_is_not_there_is_one_line(tmp_path):
    proc = run_cli("prompts", "missing.json", "--out", "p.txt", cwd=tmp_path)
    assert_fails(proc, 2, "captions source missing.json does not exist")
