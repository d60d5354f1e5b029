"""What a newcomer types, from a folder outside the checkout: every shipped preset passes its checks (the shipped
teacher and prompts resolve from the package as `asset:NAME`, a user's relative paths stay relative to the working
folder), a digits preset trains through the command line, and the README's `accelerate launch -m stepdistill`
command runs. And the tests' own processes: a child takes Ctrl-C whatever the caller's SIGINT, and dies with the
test that started it."""
from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_utils import REPO, cli_env, run_cli, started
from preset_preflight import preflight

import stepdistill
from stepdistill.config import ConfigError, load_config, preset_names

ASSETS = Path(stepdistill.__file__).resolve().parent / "assets"
# presets that need the user's own data before they start; their refusal names it and the fix
NEEDS_USER_DATA = {"dmd2_warm_gan_digits": "data.image_dir runs/real_digits does not exist",
                   "fdistill_digits": "data.image_dir runs/real_digits does not exist",
                   "msd_sd15_smaller": "needs data.image_dir",
                   "instaflow_sd15": "or set objective.loss=l2"}
REAL_DIGITS_FIRST = {"dmd2_warm_gan_digits", "fdistill_digits"}  # whose documented first step writes runs/real_digits


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_passes_its_checks_from_another_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a hub id is checked for its form, not fetched
    if name in NEEDS_USER_DATA:
        with pytest.raises((ConfigError, FileNotFoundError), match=re.escape(NEEDS_USER_DATA[name])):
            preflight(name)
        if name not in REAL_DIGITS_FIRST:
            return
        from stepdistill.miniature import get_dataset

        get_dataset("digits").write_image_folder("runs/real_digits")  # the preset's documented first step
    teachers = preflight(name)
    for path in teachers:  # the analytic teacher, a hub id, a shipped asset, or an earlier stage's output
        assert path == "" or path.startswith("runs/") or (Path(path).is_absolute() and Path(path).is_dir()) or \
            (path.count("/") == 1 and not Path(path).exists()), path
    if name.endswith("_digits"):
        assert Path(teachers[0]) == ASSETS / "digits_teacher"
        assert Path(load_config(name).data.prompts_file) == ASSETS / "configs" / "digits_prompts.txt"


def test_asset_names_resolve_and_relative_paths_stay_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["teacher.kind=sd", "teacher.path=asset:shapes_teacher",
                             "data.prompts_file=prompts/mine.txt", "train.output_dir=runs/x"])
    assert cfg.teacher.path == str(ASSETS / "shapes_teacher")
    assert cfg.data.prompts_file == "prompts/mine.txt" and cfg.train.output_dir == "runs/x"
    with pytest.raises(ConfigError, match=r"teacher.path: asset:nothing names no shipped asset; give one of .*"
                                          r"asset:digits_teacher"):
        load_config(None, ["teacher.kind=sd", "teacher.path=asset:nothing"])
    with pytest.raises(ConfigError, match="names no shipped asset"):
        load_config(None, ["teacher.kind=sd", "teacher.path=asset:../presets"])


def test_a_digits_preset_trains_from_another_folder_through_the_cli(tmp_path):
    proc = run_cli("train", "--config", "vsd_digits", "train.max_steps=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "vsd_digits"
    assert (run / "final" / "model_index.json").is_file()
    saved = json.loads((run / "config.json").read_text())
    assert saved["teacher"]["path"] == str(ASSETS / "digits_teacher")


def _code_block(readme: str, section: str) -> list[str]:
    """The lines of the first ```bash block under the README's `## {section}` heading."""
    body = readme.split(f"\n## {section}\n", 1)[1]
    return body.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()


def test_ci_runs_the_readme_install_and_test_lines_in_a_fresh_venv():
    readme = (REPO / "README.md").read_text()
    install, test = _code_block(readme, "Install"), _code_block(readme, "Test")
    assert len(install) == len(test) == 1
    assert install[0].startswith("python -m venv .venv && . .venv/bin/activate && ")  # not the caller's interpreter
    assert test[0].startswith(". .venv/bin/activate && ")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci.index(install[0]) < ci.index(test[0])  # verbatim, in that order


def test_the_readme_accelerate_command_runs_from_another_folder(tmp_path):
    """The multi-process command the README documents (`accelerate launch -m stepdistill train ...`): a module of
    the installed package, so it runs from any folder, unlike a script path inside the checkout."""
    readme = (REPO / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("accelerate launch")]
    assert lines and all(" -m stepdistill " in line for line in lines), lines  # a module, never a script path
    cpu_line = next(line for line in lines if "--config regression_gmm" in line)
    args = shlex.split(cpu_line)[2:]  # after `accelerate launch`, run by this interpreter's accelerate
    cheap = ["train.max_steps=2", "objective.pairs.num=64", "train.batch_size=32", "train.output_dir=runs/module"]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *args, *cheap], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "module" / "final" / "student.json").is_file()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_started_children_take_ctrl_c_and_die_with_a_failed_test():
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job
    try:
        with started([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True) as proc:
            out, _ = proc.communicate(timeout=120)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert out.strip() == "True"  # Ctrl-C raises KeyboardInterrupt in the child

    family = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(600)']); print(child.pid, flush=True); time.sleep(600)")
    with pytest.raises(RuntimeError), started([sys.executable, "-c", family], stdout=subprocess.PIPE,
                                              text=True) as proc:
        grandchild = int(proc.stdout.readline())
        raise RuntimeError("the test failed here")
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 60  # a bound for the reaper, not a timing assertion
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
