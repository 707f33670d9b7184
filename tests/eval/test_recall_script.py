"""benchmarks/recall.py's time budget: a schedule cut off by --max-minutes is checkpointed and
kept out of the JSON, and --resume with the same --checkpoint-dir finishes it (the MQAR GPU run
of a whole device command used to end with nothing written)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "recall.py"
ENV = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}


def _run(*flags):
    cmd = [sys.executable, str(SCRIPT), "--task", "mqar", "--only", "dense", "--steps", "3", "--no-progress", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def test_cut_off_schedule_is_checkpointed_then_resumed(tmp_path):
    out, ck = tmp_path / "out", tmp_path / "ck"
    cut = _run("--out", str(out), "--checkpoint-dir", str(ck), "--max-minutes", "0.000001")
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert "stopped at step 0 of 3" in cut.stderr and not (out / "mqar.json").exists()
    assert torch.load(ck / "mqar_dense.pt", weights_only=False)["step"] == 0
    done = _run("--out", str(out), "--checkpoint-dir", str(ck), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "mqar.json").read_text())
    assert list(result["schedules"]) == ["dense"] and len(result["accuracy"]["dense"]) == 3
    assert torch.load(ck / "mqar_dense.pt", weights_only=False)["finished"]


def test_checkpoint_flags_need_a_directory(tmp_path):
    run = _run("--out", str(tmp_path), "--checkpoint-every", "2")
    assert run.returncode == 2 and "--checkpoint-every needs --checkpoint-dir" in run.stderr
