"""Receptive fields of long-context schedules at 32K tokens (`sparse_attn.eval.reach`): what
each output can be influenced by after 12 layers, and the depth at which every output sees
every earlier token. Exact (block frontier, 9 tracked outputs incl. the last).

    python benchmarks/reach_schedules.py            # ~1-6 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, progress, write_json  # noqa: E402

from sparse_attn.eval.reach import receptive_field  # noqa: E402

SCHEDULES = {
    "sliding_window 512": ["sliding_window:window=512"] * 12,
    "hybrid: window 512, causal every 4th layer": (["sliding_window:window=512"] * 3 + ["causal"]) * 3,
    "streaming 4 sinks + 508": ["streaming:sinks=4,window=508"] * 12,
    "longformer 512 + 4 globals": ["longformer:window=512,global_tokens=4,causal=true"] * 12,
    "bigbird causal, blocks of 64": ["bigbird:block=64,causal=true"] * 12,
    "dilated 64 x 8 / window 64, alternating": ["dilated:window=64,dilation=8", "sliding_window:window=64"] * 6,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--max-depth", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS / "reach_schedules.json")
    args = ap.parse_args(argv)
    result = {"env": environment("cpu"), "length": args.length, "rows": []}
    for name, schedule in progress(SCHEDULES.items(), desc="reach", unit="schedule"):
        started = time.perf_counter()
        r = receptive_field(schedule, args.length, max_depth=args.max_depth)
        result["rows"].append({
            "schedule": name, "layers": len(schedule), "layer_specs": sorted(set(schedule)),
            "coverage_of_possible_at_12": float(r.coverage_of_possible[-1]),
            "farthest_back_at_12": int(r.farthest_back[-1].max()),
            "min_depth_full": r.min_depth_full, "searched_to": args.max_depth,
            "upper_bound": r.upper_bound, "seconds": time.perf_counter() - started})
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
