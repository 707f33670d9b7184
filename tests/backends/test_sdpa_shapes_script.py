"""benchmarks/sdpa_shapes.py on the CPU at tiny shapes: every kernel timed or marked unavailable
with its reason, on lengths no other kernel met, both passes; bad arguments exit 2 with the flag named."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "sdpa_shapes.py"
ENV = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}


def test_sdpa_shapes_script_times_each_kernel(tmp_path):
    out = tmp_path / "shapes.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--dtype", "float32", "--lengths", "3", "--min-len", "16",
           "--max-len", "40", "--rows", "2", "--heads", "2", "--dim", "8", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    kernels = result["kernels"]
    assert {"sdpa default", "sdpa math", "sparse_attn full (auto)"} <= set(kernels)
    timed = [row["lengths"] for row in kernels.values() if row["available"]]
    met = [n for lengths in timed for n in lengths]
    # each kernel its own 3 lengths, met by no other (a shared stream would warm later kernels' plans)
    assert all(len(lengths) == 3 for lengths in timed) and len(set(met)) == len(met)
    assert all(16 <= n <= 40 for n in met)
    for label, row in kernels.items():
        if row["available"]:
            assert [p["calls"] for p in row["passes"]] == [3, 3], label
            assert all(0 < p["median_ms"] <= p["max_ms"] for p in row["passes"]), label
        else:
            assert row["reason"], label
    assert kernels["sdpa default"]["available"] and kernels["sparse_attn full (auto)"]["available"]


def test_sdpa_shapes_script_rejects_more_lengths_than_the_range_holds(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--lengths", "10", "--min-len", "16", "--max-len", "20",
           "--out", str(tmp_path / "x.json")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 2 and "--lengths" in run.stderr
