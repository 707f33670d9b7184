"""benchmarks/cp_simulate.py on the CPU (blocked backend, tiny shapes): rows for every world
size, the global rows' calls timed on their sources when --global-rows plans them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cp_simulate_script_times_global_rows(tmp_path):
    out = tmp_path / "cp_sim.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cp_simulate.py"), "--device", "cpu", "--backend", "blocked",
           "--lengths", "512", "--heads", "2", "--kv-heads", "1", "--dim", "16", "--dtype", "float32",
           "--window", "64", "--world-sizes", "2", "4", "--global-rows", "--patterns", "P.longformer({w}, 16)",
           "--out", str(out)]
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["world_size"] for r in rows] == [2, 4]
    for r in rows:
        assert r["global_rows"] and r["global_steps"] > 0, r
        assert r["max_abs_diff_vs_unsplit"] < 1e-5
        assert sum(r["rank_global_forward_s"]) > 0 and r["global_forward_ratio"] > 0
        assert all(t >= g for t, g in zip(r["rank_forward_s"], r["rank_global_forward_s"]))  # included in the totals
