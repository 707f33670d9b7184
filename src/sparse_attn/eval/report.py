"""One page with the whole trade-off: speed and memory against length, fidelity, decoding,
training and the long-context evaluations, from the JSON (and PNG) files of a results folder.

    from sparse_attn.eval.report import write_report
    write_report("benchmarks/results", "report.md")          # sparse-attn report does this
    write_report("benchmarks/results", "report.md", html="report.html")   # + one self-contained HTML file

The page has the sections Environment, Speed and memory vs length, Fidelity, Decoding, Training,
Evaluation (needle, receptive field, passkey, MQAR, ListOps, a real transformers model: hf_*)
and Other files. Each block says which file it came from; a section with no file, or a file
that cannot be rendered, becomes a one-line note: writing the report never fails because of
what is (not) in the folder.

The renderers of the README's benchmark tables live here too (`benchmarks/tables.py` is a thin
wrapper): each takes the loaded JSON and, for its picture, the results folder (`results_dir`:
the picture is linked only when it exists there) and the prefix of image links (`link_prefix`,
default: the folder as given). The README links `benchmarks/results/NAME.png`; a report links
relative to its own folder (`os.path.relpath`).
"""

from __future__ import annotations

import base64
import html as _html
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

PathLike = str | os.PathLike
DEFAULT_TITLE = "sparse_attn report: speed, memory and fidelity"
GPU_PLOT = "gpu_patterns.png"


# ------------------------------------------------------------------------------ helpers
def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _failure(message: str) -> str:
    return "OOM" if ("OutOfMemory" in message or "out of memory" in message) else "error"


def _link(link_prefix: str, name: str) -> str:
    return quote(f"{link_prefix.rstrip('/')}/{name}" if link_prefix else name)


def _prefix(results_dir: PathLike | None, link_prefix: str | None) -> str:
    if link_prefix is not None:
        return link_prefix
    return "" if results_dir is None else Path(results_dir).as_posix()


def _image(alt: str, name: str, results_dir: PathLike | None, link_prefix: str | None) -> list[str]:
    """["", "![alt](prefix/name)"] when results_dir/name exists, else []."""
    if results_dir is None or not (Path(results_dir) / name).is_file():
        return []
    return ["", f"![{alt}]({_link(_prefix(results_dir, link_prefix), name)})"]


def relative_prefix(results_dir: PathLike, out_path: PathLike) -> str:
    """The link prefix from the folder of `out_path` to `results_dir`, POSIX style ("" if same)."""
    rel = os.path.relpath(os.path.abspath(results_dir), os.path.dirname(os.path.abspath(out_path)))
    return "" if rel == os.curdir else Path(rel).as_posix()


# ------------------------------------------------------------------------------ layouts
def layout_table(data: dict, *, results_dir: PathLike | None = None, link_prefix: str | None = None) -> str:
    env = data["env"]
    if env.get("device") == "cuda":
        title = (f"**Layout construction on the GPU** (`python benchmarks/layout_build.py --device cuda`; "
                 f"{env.get('gpu', 'cuda')}, torch {env['torch']}). Median of 5 fresh builds, synchronised; peak = "
                 "CUDA allocator peak during one build.")
    else:
        title = (f"**Layout construction** (`python benchmarks/layout_build.py`; torch {env['torch']}, "
                 f"{env['threads']} threads). Median of 5 fresh builds; peak = torch allocations during one build.")
    lines = [
        f"{title} For scale: a dense bool mask at 1,048,576 tokens is 1 TiB.",
        "",
        "| pattern (W=4096) | N | block | build ms | non-empty blocks | layout MiB | peak MiB during build |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['pattern']} | {r['N']:,} | {r['block']} | {_failure(r['error'])} | - | - | - |")
            continue
        lines.append(f"| {r['pattern']} | {r['N']:,} | {r['block']} | {r['build_s'] * 1e3:.0f} | {r['nnz_blocks']:,} | "
                     f"{r['layout_bytes'] / 2**20:.1f} | {_mib(r.get('peak_build_bytes'))} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- GPU
GPU_METHODS = {  # method -> label in tables and plots
    "sparse_attn_triton": "triton (ours)",
    "sparse_attn_flex": "flex (ours)",
    "flexattention": "FlexAttention",
    "flexattention_flash": "FlexAttention (FLASH backend)",
    "sdpa_mask": "SDPA+mask",
    "sdpa_causal": "SDPA causal",
}


def gpu_files(results_dir: PathLike) -> list[Path]:
    """The GPU pattern results of a folder: gpu_patterns*.json, sorted."""
    return sorted(Path(results_dir).glob("gpu_patterns*.json"))


def load_gpu(paths: Sequence[PathLike]) -> tuple[list[dict], dict[tuple, dict]]:
    """(payloads, merged rows by (pattern, N, method)): a later file's row replaces an earlier
    one unless only the earlier one has timings."""
    payloads, rows = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        payloads.append(data)
        for r in data["rows"]:
            key = (r["pattern"], r["N"], r["method"])
            if key in rows and "fwd_ms" in rows[key] and "fwd_ms" not in r:
                continue  # keep timings over a later failure or skip
            rows[key] = r
    return payloads, rows


def _gpu_ms(r: dict | None, pass_: str) -> str:
    if r is None:
        return "-"
    if f"{pass_}_ms" in r:
        x = r[f"{pass_}_ms"]
        return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"
    message = r.get("error") or r.get(f"{pass_}_error")
    if message:
        return _failure(message)
    return "n/a" if ("skipped" in r or f"{pass_}_skipped" in r) else "-"


def _num(r: dict | None, key: str, spec: str) -> str:
    return "-" if not r or r.get(key) is None else format(r[key], spec)


def _ratio(slow: dict | None, fast: dict | None, pass_: str) -> str:
    key = f"{pass_}_ms"
    if not slow or not fast or key not in slow or key not in fast:
        return "-"
    return f"{slow[key] / fast[key]:.2f}x"


def gpu_table(paths: Sequence[PathLike], *, results_dir: PathLike | None = None,
              link_prefix: str | None = None) -> str:
    payloads, rows = load_gpu(paths)
    envs = {(p["env"].get("gpu", "?"), p["env"]["torch"], p["env"].get("triton", "?")) for p in payloads}
    cfg = payloads[0]["config"]
    formulas = payloads[0]["formulas"]
    where = "; ".join(f"{gpu}, torch {torch}, triton {triton}" for gpu, torch, triton in sorted(envs))
    commands = ", ".join(f"`{' '.join(Path(p['command'][0]).name if i == 0 else a for i, a in enumerate(p['command']))}`"
                         for p in payloads)
    lines = [
        (f"**GPU, patterns vs FlexAttention and SDPA** ({where}; B={cfg['B']}, H={cfg['H']}, D={cfg['D']}, "
         f"{cfg['dtype']}; one process per run: {commands}). "
         "`triton` = `sparse_attention(q, k, v, pattern, backend=\"triton\")`; `flex (ours)` = our flex backend given "
         "the 128x128 layout; `FlexAttention` = `torch.compile(flex_attention)` with `create_block_mask(..., "
         "_compile=True)` on the pattern's `mask_mod` (its build time in its own column); `SDPA+mask` = SDPA with the "
         f"dense bool mask (N <= {cfg['max_dense']:,}); `SDPA causal` = dense causal SDPA, for scale. Times are medians in ms "
         "(`triton.testing.do_bench`, or a few synchronised calls for calls over 20 ms); `vs FA` = FlexAttention "
         "time / triton time. torch._dynamo is reset before each pattern and length. "
         f"Effective TFLOP/s = {formulas['effective_tflops_fwd']}; dense-equivalent TFLOP/s = "
         f"{formulas['dense_equiv_tflops_fwd']} (fwd+bwd: x3.5). Peak = CUDA allocator peak of one triton forward "
         "beyond what was allocated before it. Error = max abs vs float64 on the last 256 queries (triton / flex ours). "
         "OOM / error / n/a (not run by design) as marked; failures listed below."),
        "",
        ("| pattern | N | density | triton fwd ms | flex (ours) fwd | FlexAttention fwd | SDPA+mask fwd | SDPA causal fwd "
         "| triton vs FA fwd | triton fwd+bwd ms | flex (ours) fwd+bwd | FlexAttention fwd+bwd | SDPA causal fwd+bwd "
         "| triton vs FA fwd+bwd | triton eff. TFLOP/s fwd | triton dense-equiv TFLOP/s fwd | triton peak MiB "
         "| layout build ms | create_block_mask ms | max err triton / flex |"),
        "|" + "---|" * 20,
    ]
    order = list(payloads[0]["patterns"])
    pairs = sorted({(p, n) for p, n, m in rows if m != "sdpa_causal" or (p, n, "sparse_attn_triton") in rows},
                   key=lambda pn: (order.index(pn[0]) if pn[0] in order else len(order), pn[1]))
    failures = []
    for pattern, n in pairs:
        got = {m: rows.get((pattern, n, m)) for m in GPU_METHODS}
        causal = rows.get(("causal", n, "sdpa_causal"))
        tri, flex, fa = got["sparse_attn_triton"], got["sparse_attn_flex"], got["flexattention"]
        facts = next((r for r in got.values() if r and "density" in r), {})
        errs = " / ".join(_num(r, "max_err_last_rows", ".1e") for r in (tri, flex))
        lines.append(
            f"| {pattern} | {n:,} | {_num(facts, 'density', '.4f')} | {_gpu_ms(tri, 'fwd')} | {_gpu_ms(flex, 'fwd')} | "
            f"{_gpu_ms(fa, 'fwd')} | {_gpu_ms(got['sdpa_mask'], 'fwd')} | {_gpu_ms(causal, 'fwd')} | "
            f"{_ratio(fa, tri, 'fwd')} | {_gpu_ms(tri, 'fwd_bwd')} | {_gpu_ms(flex, 'fwd_bwd')} | "
            f"{_gpu_ms(fa, 'fwd_bwd')} | {_gpu_ms(causal, 'fwd_bwd')} | {_ratio(fa, tri, 'fwd_bwd')} | "
            f"{_num(tri, 'effective_tflops_fwd', '.0f')} | {_num(tri, 'dense_equiv_tflops_fwd', '.0f')} | "
            f"{_mib(tri.get('fwd_peak_bytes') if tri else None)} | {_num(facts, 'layout_build_ms', '.1f')} | "
            f"{_num(fa, 'create_block_mask_ms', '.1f')} | {errs} |")
        for m, r in got.items():
            for key, stage in (("error", "setup"), ("fwd_error", "fwd"), ("fwd_bwd_error", "fwd+bwd"),
                               ("bwd_error", "bwd")):
                if r and key in r:
                    failures.append(f"{pattern} N={n:,} {GPU_METHODS[m]} {stage}: {r[key][:160]}")
    if failures:
        lines += ["", "Failures: " + "; ".join(failures) + "."]
    not_run = [x for p in payloads for x in p.get("not_run", [])]
    if not_run:
        lines += ["", f"Not run (deadline of the run): {', '.join(not_run)}."]
    lines += _image("GPU time against length", GPU_PLOT, results_dir, link_prefix)
    return "\n".join(lines)


def gpu_plot(paths: Sequence[PathLike], out: PathLike) -> Path:
    """Time against N, log-log, one panel per pattern; solid = forward, dashed = forward+backward.
    Written to `out` (needs matplotlib); returns it."""
    from .._extras import figure

    payloads, rows = load_gpu(paths)
    order = list(payloads[0]["patterns"])
    patterns = sorted({p for p, _, m in rows if m != "sdpa_causal"},
                      key=lambda p: order.index(p) if p in order else len(order))
    cols = min(3, max(1, len(patterns)))
    nrows = -(-len(patterns) // cols)
    fig = figure(figsize=(4.2 * cols, 3.4 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    import matplotlib  # present: figure() checked

    colors = dict(zip(GPU_METHODS, matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, pattern in zip(axes.flat, patterns):
        for method, label in GPU_METHODS.items():
            source = "causal" if method == "sdpa_causal" else pattern
            for pass_, style in (("fwd", "-"), ("fwd_bwd", "--")):
                pts = sorted((n, r[f"{pass_}_ms"]) for (p, n, m), r in rows.items()
                             if p == source and m == method and f"{pass_}_ms" in r)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[method],
                            label=f"{label} {'fwd' if pass_ == 'fwd' else 'fwd+bwd'}")
        ax.set(xscale="log", yscale="log", title=pattern, xlabel="N (tokens)", ylabel="ms")
        lengths = sorted({n for p, n, _ in rows if p == pattern})
        ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(patterns):]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=8)
    env = payloads[0]["env"]
    fig.suptitle(f"{env.get('gpu', 'GPU')}, torch {env['torch']}: time per call (solid fwd, dashed fwd+bwd)")
    fig.tight_layout(rect=(0, 0.08 + 0.02 * (len(labels) // 5), 1, 0.95))
    fig.savefig(out, dpi=120)
    return Path(out)


def cpu_table(data: dict, *, results_dir: PathLike | None = None, link_prefix: str | None = None) -> str:
    env = data["env"]
    lines = [
        (f"**CPU, patterns vs FlexAttention and SDPA** (`python benchmarks/cpu_patterns.py`; B=1, H=8, D=64, fp32; "
         f"torch {env['torch']}, {env['threads']} threads, one process). `blocked` = our CPU backend through "
         "`sparse_attention(q, k, v, pattern)`; `flex` = `torch.compile(flex_attention)` on CPU with a BlockMask of the "
         "same pattern (128-blocks, from our layout); `SDPA+mask` = SDPA with the dense bool mask. Times are medians "
         "(torch.utils.benchmark). 1st call includes layout + plan for `blocked`, compile for `flex`. "
         "Effective TFLOP/s = 4·B·H·D·(allowed pairs) / time. Peak = torch allocations during one forward beyond "
         "the inputs. Error = max abs vs the float64 reference on the first and last 128 queries."),
        "",
        ("| N | pattern | density | blocked ms | flex ms | flex / blocked | SDPA+mask ms | blocked fwd+bwd ms | "
         "blocked 1st call ms | flex 1st call s | eff. TFLOP/s | peak MiB | max err |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        ratio = f"{r['blocked_vs_flex']:.2f}x" if "blocked_vs_flex" in r else "-"
        first_flex = f"{r['flex_first_call_s']:.1f}" if "flex_first_call_s" in r else "-"
        lines.append(
            f"| {r['N']:,} | {r['pattern']} | {r['density']:.4f} | {_ms(r['blocked_fwd_s'])} | {_ms(r.get('flex_fwd_s'))} | "
            f"{ratio} | {_ms(r.get('sdpa_mask_fwd_s'))} | {_ms(r.get('blocked_fwd_bwd_s'))} | "
            f"{_ms(r['blocked_first_call_s'])} | {first_flex} | {r['effective_tflops']:.3f} | "
            f"{_mib(r.get('blocked_peak_beyond_inputs_bytes'))} | {r['blocked_max_err']:.1e} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------- mechanisms
def mechanisms_table(data: dict, *, results_dir: PathLike | None = None, link_prefix: str | None = None) -> str:
    """cpu_mechanisms.json: ms and peak MiB per mechanism (rows) and N (columns), plus goals."""
    env = data["env"]
    rows = data["rows"]
    lengths = sorted({r["N"] for r in rows})
    names = list(dict.fromkeys(r["mechanism"] for r in rows))
    by = {(r["mechanism"], r["N"]): r for r in rows}
    skipped = {(r["mechanism"], r["N"]) for r in data.get("skipped", [])}
    updated = "; rows re-measured with `--update` after the first run: " + ", ".join(
        sorted({m for u in data.get("updated", []) for m, _ in u["rows"]})) if data.get("updated") else ""
    lines = [
        (f"**CPU, mechanisms against length** (`python benchmarks/cpu_mechanisms.py`; {data['setup']}; torch "
         f"{env['torch']}, {env['threads']} threads{updated}). ms = median time of one call; MiB = peak torch "
         "allocation during one call (profiler); `skip` = not run (estimated over a minute from the previous "
         "length). An N x N fp32 score matrix of one head is 4 MiB at 1K, 64 MiB at 4K, 1 GiB at 16K, 16 GiB at 64K."),
        "",
        "| mechanism | " + " | ".join(f"{n // 1024}K ms | {n // 1024}K MiB" for n in lengths) + " |",
        "|---|" + "---|---|" * len(lengths),
    ]
    for name in names:
        cells = []
        for n in lengths:
            r = by.get((name, n))
            if r is None or "seconds" not in r:
                cells += ["skip" if (name, n) in skipped else (_failure(r["error"]) if r and "error" in r else "-"), "-"]
            else:
                cells += [f"{r['seconds'] * 1e3:.0f}", _mib(r.get("peak_bytes"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    goals = data.get("goals", {})
    lines.append("")
    lines.append("| goal (issue #5) | " + " | ".join(k for k in goals if k != "peak_below_n2") + " |")
    lines.append("|---|" + "---|" * (len(goals) - ("peak_below_n2" in goals)))
    for key, label in (("time_64k_over_16k", "time 64K / time 16K (goal <= 5)"),
                       ("speedup_vs_dense_at_16k", "dense SDPA time / time at 16K (goal >= 10; causal vs SDPA causal)")):
        lines.append(f"| {label} | " + " | ".join(
            "-" if v.get(key) is None else f"{v[key]:.1f}" for k, v in goals.items() if k != "peak_below_n2") + " |")
    return "\n".join(lines)


def fidelity_table(data: dict, *, results_dir: PathLike | None = None, link_prefix: str | None = None) -> str:
    rows = data["rows"]
    kinds = list(dict.fromkeys(r["inputs"] for r in rows))
    lengths = sorted({r["N"] for r in rows})
    names = list(dict.fromkeys(r["mechanism"] for r in rows))
    by = {(r["inputs"], r["N"], r["mechanism"]): r for r in rows}
    cols = [(kind, n) for kind in kinds for n in lengths]
    lines = [
        (f"**Fidelity against dense softmax** (`python benchmarks/fidelity.py --plot benchmarks/results/fidelity.png`; "
         f"{data['setup']}). Each cell: relative output error "
         f"({data['formulas']['rel_err']}) / recall ({data['formulas']['recall']}; `-` where it does not apply or N "
         "> 4096 for the N x N pair masks of LSH and routing)."),
        "",
        "| mechanism | " + " | ".join(f"{kind} {n // 1024}K" for kind, n in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name in names:
        cells = []
        for kind, n in cols:
            r = by.get((kind, n, name))
            if r is None:
                cells.append("-")
                continue
            rec = "-" if r.get("recall") is None else f"{r['recall']:.2f}"
            cells.append(f"{r['rel_err']:.3f} / {rec}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _image("fidelity", "fidelity.png", results_dir, link_prefix)
    return "\n".join(lines)


def peers_table(data: dict, *, results_dir: PathLike | None = None, link_prefix: str | None = None) -> str:
    env = data["env"]
    lines = [
        (f"**Against performer-pytorch {env.get('performer_pytorch')} and reformer-pytorch "
         f"{env.get('reformer_pytorch')}** (`python benchmarks/peers_cpu.py`; {data['setup']}; same inputs, same "
         "process). Error = relative to dense float64 attention with the same semantics (Performer: softmax; "
         "LSH: shared-QK softmax without self), mean over seeds."),
        "",
        "| setting | N | peer | error ours | error peer | ms ours | ms peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['setting']} | {r['N']:,} | {r['peer']} | {r['rel_err_sparse_attn']:.3f} | "
                     f"{r['rel_err_peer']:.3f} | {r['ms_sparse_attn']:.1f} | {r['ms_peer']:.1f} |")
    return "\n".join(lines)


def decode_table(data: dict, name: str = "decode", *, results_dir: PathLike | None = None,
                 link_prefix: str | None = None) -> str:
    """decode*.json; `name` is the file's stem, whose .png is linked when it exists."""
    env, setup = data["env"], data["setup"]
    where = f"{env.get('gpu', env['device'])}" if env["device"] == "cuda" else f"{env['device']}, {env['threads']} threads"
    command = ("python benchmarks/decode.py --plot benchmarks/results/decode.png" if env["device"] != "cuda" else
               f"PYTHONPATH=src python3 benchmarks/decode.py --device cuda --tokens {setup['tokens']} "
               f"--block {setup['block']} [--caches ...]")
    lines = [
        (f"**Decoding with caches** (`{command}`; {setup['tokens']:,} tokens asked, greedy, 2 layers, dim 64, 4 heads, "
         f"window {setup['window']}, {setup['sinks']} sinks; {where}, torch {env['torch']}). Latency = median "
         f"ms per token over a block of {setup['block']}; memory = bytes held by the caches."),
        "",
        ("| cache (pattern) | tokens done | first block ms/token | last block ms/token | last / first | "
         "cache MiB after 1 block | cache MiB at the end |"),
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        done = r.get("tokens_done", setup["tokens"])
        lines.append(f"| {r['cache']} ({r['mechanism']}) | {done:,} | {r['block_median_ms'][0]:.2f} | "
                     f"{r['block_median_ms'][-1]:.2f} | {r['last_over_first']:.2f}x | "
                     f"{r['memory_bytes'][0] / 2**20:.2f} | {r['final_memory_bytes'] / 2**20:.2f} |")
    for note in data.get("notes", []):
        lines += ["", f"_{note}_"]
    lines += _image(name, f"{name}.png", results_dir, link_prefix)
    return "\n".join(lines)


def block_topk_gpu_table(data: dict, *, results_dir: PathLike | None = None, link_prefix: str | None = None) -> str:
    env = data["env"]
    lines = [
        (f"**Block top-k on the GPU** (`PYTHONPATH=src python3 benchmarks/gpu_block_topk.py`; {data['setup']}; "
         f"{env.get('gpu', env['device'])}, torch {env['torch']}, triton {env.get('triton', '-')}). ms per call "
         "(median); end to end = selection + layout + plan + triton kernel, what `block_topk_attention` costs; "
         "old = the layout from the selection table and the plan with its backward walk (before issue #16), "
         "new = the layout and plan built on the device with no host read; e2e / kernel: issue #16's goal is "
         "<= 1.10."),
        "",
        ("| N | blocks kept | select | layout old / new | layout (via pattern) | plan old / new | kernel | "
         "end to end fwd old / new | new e2e / kernel | SDPA causal fwd | speed-up | end to end fwd+bwd | "
         "SDPA causal fwd+bwd | speed-up |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "device_path" not in r:  # a file from before issue #16: its layout, plan and end to end were the old path
            r = {**r, "old_layout_ms": r.get("layout_ms"), "old_plan_ms": r.get("plan_ms"),
                 "old_end_to_end_ms": r.get("triton_end_to_end_ms"), "layout_ms": None, "plan_ms": None,
                 "triton_end_to_end_ms": None}

        def ms(key, r=r):  # the file holds milliseconds
            return "-" if r.get(key) is None else f"{r[key]:.2f}"

        def ratio(key, r=r):
            return "-" if r.get(key) is None else f"{r[key]:.2f}x"

        lines.append(
            f"| {r['N']:,} | {r['top_k_blocks']}/{r['kv_blocks']} ({100 * r['selected_pairs_fraction']:.1f}% of pairs) "
            f"| {ms('select_ms')} | {ms('old_layout_ms')} / {ms('layout_ms')} | {ms('layout_via_pattern_ms')} | "
            f"{ms('old_plan_ms')} / {ms('plan_ms')} | {ms('kernel_ms')} | "
            f"{ms('old_end_to_end_ms')} / {ms('triton_end_to_end_ms')} | {ratio('new_end_to_end_over_kernel')} | "
            f"{ms('sdpa_causal_ms')} | {ratio('speedup_vs_sdpa_causal')} | {ms('triton_end_to_end_fwd_bwd_ms')} | "
            f"{ms('sdpa_causal_fwd_bwd_ms')} | {ratio('speedup_vs_sdpa_causal_fwd_bwd')} |")
    return "\n".join(lines)


def padded_gpu_table(data: dict, *, results_dir: PathLike | None = None, link_prefix: str | None = None) -> str:
    """gpu_padded.json: a padded batch, its rows alone, packed, unpadded and SDPA with a dense mask."""
    env = data["env"]
    lines = [
        (f"**Padded batches and packed sequences on the GPU** (`PYTHONPATH=src python3 benchmarks/gpu_padded.py`; "
         f"{data['setup']}; {env.get('gpu', env['device'])}, torch {env['torch']}, triton {env.get('triton', '-')}). "
         "ms per call, forward / forward+backward (median). padded = `key_padding_mask` (one call per row "
         "geometry); unpadded batch = the same B x N tokens all real; rows alone = each row cut to its real tokens, "
         "one call each; packed = the real tokens in one row with `document_ids`; SDPA + mask = SDPA with the dense "
         "(B, 1, N, N) bool mask of window and padding, as transformers builds it."),
        "",
        "| N | real tokens | padded | unpadded batch | rows alone | packed | SDPA + mask |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(entry):
        if not entry or "fwd_ms" not in entry:
            return "failed" if entry else "-"
        return f"{entry['fwd_ms']:.1f} / {entry['fwd_bwd_ms']:.1f}"

    for r in data["rows"]:
        lines.append(f"| {r['N']:,} | {r['real_tokens']:,} | {cell(r.get('padded'))} | {cell(r.get('unpadded_batch'))} | "
                     f"{cell(r.get('rows_alone'))} | {cell(r.get('packed'))} | {cell(r.get('sdpa_mask'))} |")
    return "\n".join(lines)


def train_compare_table(data: dict, name: str = "train_compare", *, results_dir: PathLike | None = None,
                        link_prefix: str | None = None) -> str:
    """train_compare*.json; `name` is the file's stem, whose .png is linked when it exists."""
    env, p = data["env"], data["setup"]
    where = env.get("gpu", env["device"]) if env["device"] == "cuda" else f"{env['device']}, {env['threads']} threads"
    command = f"python benchmarks/train_compare.py --preset {data['preset']}"
    if env["device"] == "cuda":
        command = "PYTHONPATH=src python3 " + command.removeprefix("python ") + " --device cuda"
    lines = [
        (f"**Validation loss at equal steps** (`{command}`"
         f"; byte-level causal LM, dim {p['dim']}, {p['layers']} layers, {p['heads']} heads, seq {p['seq_len']}, "
         f"batch {p['batch']}, {p['steps']} steps, {p['dtype']}; {data['corpus']}; {where}, torch {env['torch']}). "
         "Loss in nats per byte on the same validation windows; lower is better."),
        "",
        "| attention | per-layer mechanisms | val loss | vs dense | seconds |",
        "|---|---|---|---|---|",
    ]
    dense = next((r["final_val_loss"] for r in data["rows"] if r["name"] == "dense"), None)
    for r in data["rows"]:
        mech = r["mechanisms"] if isinstance(r["mechanisms"], str) else " / ".join(r["mechanisms"])
        delta = f"{r['final_val_loss'] - dense:+.4f}" if dense is not None else "-"
        lines.append(f"| {r['name']} | `{mech}` | {r['final_val_loss']:.4f} | {delta} | {r['seconds']:.0f} |")
    lines += _image(name, f"{name}.png", results_dir, link_prefix)
    return "\n".join(lines)


def gpu_phase_table(paths: Sequence[PathLike]) -> str:
    """Per phase (forward, backward alone), per pattern and length: our triton time against
    FlexAttention's (and its FLASH backend where it ran), so the next gap is visible. Empty when
    no run timed the backward alone (`gpu_patterns.py --passes ... bwd`)."""
    _, rows = load_gpu(paths)
    timed = sorted({(p, n) for p, n, m in rows if m == "sparse_attn_triton" and "bwd_ms" in rows[(p, n, m)]},
                   key=lambda pn: (pn[0], pn[1]))
    if not timed:
        return ""
    lines = ["**Per phase: triton against FlexAttention** (same runs as the table above; backward = "
             "`torch.autograd.grad` over one kept forward graph, the backward alone). ms, median; `FA / ours` above 1 "
             "= we are faster.",
             "",
             "| pattern | N | fwd ours | fwd FlexAttention | fwd FA / ours | fwd FLASH backend | bwd ours "
             "| bwd FlexAttention | bwd FA / ours | bwd FLASH backend |",
             "|" + "---|" * 10]
    for pattern, n in timed:
        tri, fa = rows.get((pattern, n, "sparse_attn_triton")), rows.get((pattern, n, "flexattention"))
        fl = rows.get((pattern, n, "flexattention_flash"))
        lines.append(f"| {pattern} | {n:,} | {_gpu_ms(tri, 'fwd')} | {_gpu_ms(fa, 'fwd')} | {_ratio(fa, tri, 'fwd')} | "
                     f"{_gpu_ms(fl, 'fwd')} | {_gpu_ms(tri, 'bwd')} | {_gpu_ms(fa, 'bwd')} | {_ratio(fa, tri, 'bwd')} | "
                     f"{_gpu_ms(fl, 'bwd')} |")
    return "\n".join(lines)


def render(results_dir: PathLike, *, gpu_paths: Sequence[PathLike] | None = None,
           link_prefix: str | None = None) -> str:
    """The README's benchmark block: every known table of `results_dir`, in README order.
    `gpu_paths`: GPU pattern results to merge (None: `gpu_files(results_dir)`)."""
    results = Path(results_dir)
    kw = {"results_dir": results, "link_prefix": link_prefix}
    parts = []
    for name, fn in (("layout_build.json", layout_table), ("cpu_patterns.json", cpu_table),
                     ("layout_build_gpu.json", layout_table)):
        path = results / name
        if path.exists():
            parts.append(fn(json.loads(path.read_text()), **kw))
    gpu_paths = gpu_files(results) if gpu_paths is None else list(gpu_paths)
    if gpu_paths:
        parts.append(gpu_table(gpu_paths, **kw))
        phases = gpu_phase_table(gpu_paths)
        if phases:
            parts.append(phases)
    for name, fn in (("cpu_mechanisms.json", mechanisms_table), ("fidelity.json", fidelity_table),
                     ("peers_cpu.json", peers_table), ("gpu_block_topk.json", block_topk_gpu_table),
                     ("gpu_padded.json", padded_gpu_table),
                     ("decode.json", decode_table),
                     ("decode_gpu.json", lambda d, **k: decode_table(d, "decode_gpu", **k)),
                     ("train_compare_cpu.json", lambda d, **k: train_compare_table(d, "train_compare_cpu", **k)),
                     ("train_compare_gpu.json", lambda d, **k: train_compare_table(d, "train_compare_gpu", **k))):
        path = results / name
        if path.exists():
            parts.append(fn(json.loads(path.read_text()), **kw))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------- evaluations
def _cell(value: Any) -> str:
    """A Markdown table cell for a scalar."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _markdown_table(rows: Sequence[dict], first: str | None = None) -> list[str]:
    """The scalar fields of `rows` (columns in order of first appearance)."""
    columns = list(dict.fromkeys(k for r in rows for k, v in r.items() if _is_scalar(v)))
    if first is not None:
        columns = [first] + [c for c in columns if c != first]
    if not columns:
        return []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) if _is_scalar(r.get(c)) else "..." for c in columns) + " |")
    return lines


def needle_summary(data: dict, name: str = "needle", *, results_dir: PathLike | None = None,
                   link_prefix: str | None = None) -> str:
    """needle*.json (`NeedleResult.to_dict()`): one row per mechanism, the full mass grids
    (`NeedleResult.summary()`), and the heatmap `<name>.png` when it exists."""
    import torch

    from .needle import NeedleResult

    result = NeedleResult.from_dict(data)
    cfg = result.config
    cells = len(result.lengths) * len(result.depths)
    lines = [
        (f"**Needle in a haystack** (`sparse-attn eval needle`; lengths {', '.join(map(str, result.lengths))}; "
         f"{len(result.depths)} depths; heads {cfg.get('heads')}, dim {cfg.get('dim')}, trials {cfg.get('trials')}, "
         f"strength {cfg.get('strength')}, causal {cfg.get('causal')}, {cfg.get('device', '?')} "
         f"{cfg.get('dtype', '')}, torch {cfg.get('torch', '?')}). Mass = attention the query puts on the needle key "
         f"(mean over trials, heads and queries); retrieved = mass > {result.threshold}."),
        "",
        (f"| mechanism | retrieved cells (of {cells}) | mean mass | lowest mass | s/call at N={max(result.lengths):,} "
         "| errors |"),
        "|---|---|---|---|---|---|",
    ]

    def row(label, grid, retrieved, secs, errors):
        finite = grid[~torch.isnan(grid)]
        mean = f"{finite.mean().item():.3f}" if finite.numel() else "-"
        low = f"{finite.min().item():.3f}" if finite.numel() else "-"
        last = "-" if secs is None or math.isnan(secs) else f"{secs:.2e}"
        lines.append(f"| {_cell(label)} | {int(retrieved.sum())} | {mean} | {low} | {last} | {errors} |")

    longest = result.lengths.index(max(result.lengths))
    row("dense softmax (float64 reference)", result.reference["mass"], result.reference_retrieved, None, 0)
    for label in result.mechanisms:
        secs = result.seconds.get(label)
        row(label, result.mass[label], result.retrieved[label], None if secs is None else float(secs[longest]),
            len(result.errors.get(label, [])))
    lines += ["", "```", result.summary(), "```"]
    lines += _image(f"needle heatmaps ({name})", f"{name}.png", results_dir, link_prefix)
    return "\n".join(lines)


def reach_summary(data: dict, name: str = "reach", *, results_dir: PathLike | None = None,
                  link_prefix: str | None = None) -> str:
    """reach*.json (`ReceptiveField.to_dict()`): coverage and distance per depth, the depth at
    which every output sees all it could, and the picture `<name>.png` when it exists."""
    layers = list(data["layers"])
    cov, covp = data["coverage"], data["coverage_of_possible"]
    back = [max(r) if r else 0 for r in data["farthest_back"]]
    ahead = [max(r) if r else 0 for r in data["farthest_ahead"]]
    queries = data.get("queries", [])
    block = f", block {data['block']}" if data.get("block") else ""
    found = ("not reached" if data.get("min_depth_full") is None else f"**{data['min_depth_full']}**")
    lines = [
        (f"**Receptive field** (`sparse-attn eval reach`; n={data['length']:,}, {len(layers)} layers, "
         f"{len(queries):,} tracked outputs, {'causal' if data.get('causal') else 'non-causal'}, method "
         f"{data.get('method')}{block}). Coverage = fraction of (tracked output, input) pairs connected after "
         "1..d layers (residual paths included); of possible = the same over the pairs that could be connected. "
         f"Depth at which every tracked output sees all it could: {found} (searched up to depth "
         f"{data.get('max_depth')})."),
        "",
        "| depth | layer | coverage | of possible | max back | max ahead |",
        "|---|---|---|---|---|---|",
    ]
    for d, layer in enumerate(layers):
        lines.append(f"| {d + 1} | `{layer}` | {cov[d]:.4f} | {covp[d]:.4f} | {back[d]:,} | {ahead[d]:,} |")
    if data.get("upper_bound"):
        lines += ["", "Upper bound: data-dependent layers counted as their largest reach ("
                  + "; ".join(map(str, data.get("reasons", []))) + ")."]
    lines += _image(f"receptive field ({name})", f"{name}.png", results_dir, link_prefix)
    return "\n".join(lines)


def generic_summary(data: Any, name: str, *, title: str | None = None, results_dir: PathLike | None = None,
                    link_prefix: str | None = None) -> str:
    """Any result JSON: its top-level scalars, then a table of the scalar fields of every list
    of dicts ("rows" first) and of every dict of dicts (one row per key), then `<name>.png`."""
    lines = [f"**{title or name}**"]
    if isinstance(data, list):
        data = {"rows": data}
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object or list, got {type(data).__name__}")
    scalars = [f"{k} = {_cell(v)}" for k, v in data.items() if _is_scalar(v)]
    if scalars:
        lines[0] += " (" + ", ".join(scalars) + ")"
    keys = sorted(data, key=lambda k: k != "rows")
    for key in keys:
        value = data[key]
        if key == "env":
            continue
        table: list[str] = []
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            table = _markdown_table(value)
        elif isinstance(value, dict) and value and all(isinstance(r, dict) for r in value.values()):
            table = _markdown_table([{"name": k, **r} for k, r in value.items()], first="name")
        elif isinstance(value, dict) and value and all(_is_scalar(v) for v in value.values()):
            lines += ["", f"`{key}`: " + ", ".join(f"{k} = {_cell(v)}" for k, v in value.items())]
        if table:
            lines += ["", f"`{key}`:", ""] + table
    lines += _image(name, f"{name}.png", results_dir, link_prefix)
    return "\n".join(lines)


def hf_long_context_summary(data: dict, name: str = "hf_long_context", *, results_dir: PathLike | None = None,
                            link_prefix: str | None = None) -> str:
    """`sparse-attn hf --json` (a real transformers model on sparse_attn schedules): its summary
    (table, correctness lines) and `<name>.png`."""
    from .hf_long_context import HFLongContextResult

    lines = [HFLongContextResult.from_dict(data).summary()]
    lines += _image(f"real model ({name})", f"{name}.png", results_dir, link_prefix)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the page
_Renderer = Callable[..., str]


def _stem_renderer(fn: _Renderer) -> _Renderer:
    return lambda data, path, **kw: fn(data, path.stem, **kw)


def _data_renderer(fn: _Renderer) -> _Renderer:
    return lambda data, path, **kw: fn(data, **kw)


def _titled(title: str) -> _Renderer:
    return lambda data, path, **kw: generic_summary(data, path.stem, title=title, **kw)


# (section, JSON globs with their renderer, PNG globs that belong to the section)
SECTIONS: list[tuple[str, list[tuple[str, _Renderer | None]], list[str]]] = [
    ("Speed and memory vs length", [
        ("layout_build*.json", _data_renderer(layout_table)),
        ("cpu_patterns*.json", _data_renderer(cpu_table)),
        ("gpu_patterns*.json", None),  # merged into one table
        ("cpu_mechanisms*.json", _data_renderer(mechanisms_table)),
        ("gpu_block_topk*.json", _data_renderer(block_topk_gpu_table)),
        ("gpu_padded*.json", _data_renderer(padded_gpu_table)),
    ], ["gpu_patterns*.png", "cpu_*.png", "layout_build*.png", "gpu_block_topk*.png"]),
    ("Fidelity", [
        ("fidelity*.json", _data_renderer(fidelity_table)),
        ("peers*.json", _data_renderer(peers_table)),
    ], ["fidelity*.png", "peers*.png"]),
    ("Decoding", [("decode*.json", _stem_renderer(decode_table))], ["decode*.png"]),
    ("Training", [("train_compare*.json", _stem_renderer(train_compare_table))], ["train_compare*.png"]),
    ("Evaluation", [
        ("needle*.json", _stem_renderer(needle_summary)),
        ("reach*.json", _stem_renderer(reach_summary)),
        ("passkey*.json", _titled("Passkey retrieval")),
        ("mqar*.json", _titled("Multi-query associative recall")),
        ("listops*.json", _titled("ListOps")),
        ("hf_*.json", _stem_renderer(hf_long_context_summary)),
    ], ["needle*.png", "reach*.png", "passkey*.png", "mqar*.png", "listops*.png", "hf_*.png"]),
]

_ENV_COLUMNS = ("device", "gpu", "torch", "triton", "cuda", "python", "threads")
_ENV_SKIP = {"platform", "date", "first_run", "gpu_memory_bytes", "cpu_count", "device_name"}  # device_name: gpu or cpu


def _anchor(title: str) -> str:
    """GitHub's heading anchor."""
    return re.sub(r"[^\w\- ]", "", title.lower()).strip().replace(" ", "-")


class _Page:
    def __init__(self, results_dir: PathLike, link_prefix: str) -> None:
        self.dir = Path(results_dir)
        self.prefix = link_prefix
        self.files = sorted(p for p in self.dir.iterdir() if p.is_file() and not p.name.startswith("."))
        self.data: dict[str, Any] = {}
        self.unreadable: dict[str, str] = {}
        for p in self.files:
            if p.suffix == ".json":
                try:
                    self.data[p.name] = json.loads(p.read_text())
                except (OSError, ValueError) as exc:
                    self.unreadable[p.name] = f"{type(exc).__name__}: {exc}"
        self.used: set[str] = set()  # JSON files rendered (or tried)
        self.shown: set[str] = set()  # pictures linked

    def link(self, name: str) -> str:
        return _link(self.prefix, name)

    def source(self, names: Sequence[str]) -> str:
        return "Source: " + ", ".join(f"[`{n}`]({self.link(n)})" for n in names) + "."

    def matching(self, pattern: str, suffix: str) -> list[Path]:
        return [p for p in self.files if p.suffix == suffix and p.match(pattern)]

    def note_images(self, text: str) -> None:
        for p in self.files:
            if p.suffix == ".png" and f"({self.link(p.name)})" in text:
                self.shown.add(p.name)

    def block(self, names: Sequence[str], render: Callable[[], str]) -> list[str]:
        """A rendered block under its source line, or a one-line note if it fails."""
        self.used.update(names)
        bad = [n for n in names if n in self.unreadable]
        if bad:
            return [f"_Skipped {', '.join(f'`{n}`' for n in bad)}: not readable as JSON ({self.unreadable[bad[0]]})._"]
        try:
            text = render()
        except Exception as exc:  # noqa: BLE001 - a report never fails because of one file
            return [(f"_Skipped {', '.join(f'`{n}`' for n in names)}: could not render it "
                    f"({type(exc).__name__}: {exc})._")]
        self.note_images(text)
        return [self.source(names), "", text]

    def images(self, patterns: Sequence[str]) -> list[str]:
        out = []
        for pattern in patterns:
            for p in self.matching(pattern, ".png"):
                if p.name not in self.shown:
                    self.shown.add(p.name)
                    out += [self.source([p.name]), "", f"![{p.stem}]({self.link(p.name)})"]
        return out

    def environment(self) -> list[str]:
        groups: dict[tuple, dict] = {}
        for name, data in self.data.items():
            env = data.get("env") if isinstance(data, dict) else None
            if not isinstance(env, dict):  # evaluation results record theirs in `config`
                cfg = data.get("config") if isinstance(data, dict) else None
                env = cfg if isinstance(cfg, dict) and "torch" in cfg else None
            if env is None:
                continue
            key = tuple(_cell(env.get(c)) if _is_scalar(env.get(c)) else "-" for c in _ENV_COLUMNS)
            g = groups.setdefault(key, {"files": [], "dates": [], "other": {}})
            g["files"].append(name)
            if isinstance(env.get("date"), str):
                g["dates"].append(env["date"])
            if "env" in data:
                for k, v in env.items():
                    if k not in _ENV_COLUMNS and k not in _ENV_SKIP and _is_scalar(v):
                        g["other"].setdefault(f"{k} {_cell(v)}", []).append(name)
        if not groups:
            return ["_No environment recorded: no JSON file with an `env` field._"]
        lines = [("Where each result file was measured (from the `env` field of benchmark results, the "
                 "`config` of evaluation results)."), "",
                 "| " + " | ".join(_ENV_COLUMNS) + " | dates | other | files |",
                 "|" + "---|" * (len(_ENV_COLUMNS) + 3)]
        for key, g in groups.items():
            dates = sorted(g["dates"])
            when = "-" if not dates else dates[0] if dates[0] == dates[-1] else f"{dates[0]} .. {dates[-1]}"
            other = "; ".join(f"{k} (`{'`, `'.join(names)}`)" if len(names) < len(g["files"]) else k
                              for k, names in g["other"].items()) or "-"
            files = ", ".join(f"`{n}`" for n in g["files"])
            lines.append("| " + " | ".join(key) + f" | {when} | {other} | {files} |")
        return lines

    def section(self, patterns: Sequence[tuple[str, _Renderer | None]], pictures: Sequence[str]) -> list[str]:
        kw = {"results_dir": self.dir, "link_prefix": self.prefix}
        parts: list[list[str]] = []
        for pattern, fn in patterns:
            paths = [p for p in self.matching(pattern, ".json") if p.name not in self.used]
            if not paths:
                continue
            if fn is None:  # GPU pattern results: one table merged over every run
                names = [p.name for p in paths]
                parts.append(self.block(names, lambda paths=paths: gpu_table(paths, **kw)))
                continue
            for p in paths:
                parts.append(self.block([p.name], lambda p=p, fn=fn: fn(self.data[p.name], p, **kw)))
        extra = self.images(pictures)
        if extra:
            parts.append(extra)
        if not parts:
            looked = ", ".join(f"`{g}`" for g, _ in patterns)
            return [f"_Nothing for this section in the results folder (looked for {looked})._"]
        out: list[str] = []
        for part in parts:
            out += ([""] if out else []) + part
        return out

    def others(self) -> list[str]:
        lines = []
        for p in self.files:
            if p.suffix == ".json" and p.name not in self.used:
                why = f" (not readable as JSON: {self.unreadable[p.name]})" if p.name in self.unreadable else ""
                lines.append(f"- [`{p.name}`]({self.link(p.name)}): a JSON file no section knows{why}")
            elif p.suffix not in (".json", ".png"):
                lines.append(f"- [`{p.name}`]({self.link(p.name)})")
        pictures = [p for p in self.files if p.suffix == ".png" and p.name not in self.shown]
        for p in pictures:
            lines += ["", self.source([p.name]), "", f"![{p.stem}]({self.link(p.name)})"]
            self.shown.add(p.name)
        return lines or ["_None: every file of the results folder is shown above._"]


def report_markdown(results_dir: PathLike, *, link_prefix: str | None = None, title: str = DEFAULT_TITLE,
                    source_label: str | None = None) -> str:
    """The report page as Markdown. Image and file links are `link_prefix/NAME` (default: the
    folder as given); `source_label` names the folder in the introduction (default: the same)."""
    results = Path(results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"results_dir {str(results_dir)!r}: not a folder")
    prefix = _prefix(results, link_prefix)
    page = _Page(results, prefix)
    label = source_label if source_label is not None else results.as_posix()
    sections: list[tuple[str, list[str]]] = [("Environment", page.environment())]
    for name, patterns, pictures in SECTIONS:
        sections.append((name, page.section(patterns, pictures)))
    sections.append(("Other files", page.others()))
    lines = [
        f"# {title}",
        "",
        (f"Made by `sparse-attn report` from the {len(page.files)} files of `{label}`: the benchmark results "
         "(time and peak memory against length, error against dense attention), decoding and training runs, and the "
         "long-context evaluations, so the whole trade-off between speed, memory and fidelity is on one page. "
         "Each block names the file it comes from."),
        "",
    ]
    lines += [f"- [{name}](#{_anchor(name)})" for name, _ in sections]
    for name, body in sections:
        lines += ["", f"## {name}", ""] + body
    return "\n".join(lines) + "\n"


def write_report(results_dir: PathLike, out_path: PathLike, *, title: str = DEFAULT_TITLE,
                 html: PathLike | None = None) -> list[Path]:
    """Write the report of `results_dir` to `out_path` (Markdown, links relative to its folder)
    and, when `html` is a path, the same page as one self-contained HTML file (pictures
    embedded). Returns the paths written. Raises FileNotFoundError if `results_dir` is not a
    folder; anything missing or unreadable inside it is a note on the page, not an error."""
    out = Path(out_path)
    text = report_markdown(results_dir, link_prefix=relative_prefix(results_dir, out), title=title)
    out.write_text(text)
    written = [out]
    if html is not None:
        html_path = Path(html)
        html_path.write_text(markdown_to_html(text, base_dir=out.parent, title=title))
        written.append(html_path)
    return written


# ------------------------------------------------------------------------------- HTML
_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left}th{background:#f3f3f3}
code{background:#f5f5f5;padding:0 .2em}pre{background:#f5f5f5;padding:.6em;overflow-x:auto;font-size:.85em}
img{max-width:100%}"""


def _inline(text: str, base_dir: Path | None) -> str:
    """Inline Markdown of the page (code, images, links, bold, italics) to HTML, escaped."""
    out = []
    for i, piece in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:
            out.append(f"<code>{_html.escape(piece[1:-1])}</code>")
            continue
        s = _html.escape(piece, quote=False)
        s = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", lambda m: _img(m.group(1), m.group(2), base_dir), s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![\w\\])_(\S(?:.*?\S)?)_(?!\w)", r"<em>\1</em>", s)
        out.append(s)
    html_text = "".join(out)
    # links last: their text may hold <code> from above
    return re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)",
                  lambda m: f'<a href="{m.group(2).replace(chr(34), "&quot;")}">{m.group(1)}</a>', html_text)


def _img(alt: str, src: str, base_dir: Path | None) -> str:
    """An <img>; alt and src arrive HTML-escaped. A PNG found under base_dir is embedded."""
    alt, src = _html.unescape(alt), _html.unescape(src)
    path = None if base_dir is None else base_dir / unquote(src)
    if path is not None and path.suffix.lower() == ".png" and path.is_file():
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_html.escape(alt)}" src="{_html.escape(src)}">'


def _cells(line: str) -> list[str]:
    inner = line.strip()[1:]
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def markdown_to_html(text: str, *, base_dir: PathLike | None = None, title: str = DEFAULT_TITLE) -> str:
    """The Markdown this module writes (headings, paragraphs, tables, lists, code blocks,
    images, inline code / bold / italics / links) as one HTML page. PNG images found under
    `base_dir` are embedded (data URIs), so the page stands alone. Not a general Markdown parser."""
    base = None if base_dir is None else Path(base_dir)
    lines = text.splitlines()
    body: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            body.append(f"<p>{_inline(' '.join(para), base)}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            body.append("<pre><code>" + _html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", stripped)
        if heading:
            flush()
            level, content = len(heading.group(1)), heading.group(2)
            body.append(f'<h{level} id="{_anchor(content)}">{_inline(content, base)}</h{level}>')
        elif stripped.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+",
                                                                               lines[i + 1].strip()):
            flush()
            rows = [f"<tr>{''.join(f'<th>{_inline(c, base)}</th>' for c in _cells(stripped))}</tr>"]
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(f"<tr>{''.join(f'<td>{_inline(c, base)}</td>' for c in _cells(lines[i]))}</tr>")
                i += 1
            body.append("<table>" + "".join(rows) + "</table>")
            continue
        elif stripped.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                items.append(f"<li>{_inline(lines[i].strip()[2:], base)}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif not stripped:
            flush()
        else:
            para.append(stripped)
        i += 1
    flush()
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_html.escape(title)}</title>\n'
            f"<style>\n{_CSS}\n</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
