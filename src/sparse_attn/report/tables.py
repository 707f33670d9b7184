"""The README's benchmark tables, from the JSON files that `benchmarks/` writes (and the GPU
picture). `benchmarks/tables.py` binds them to the repository's results folder and README;
`page.py` puts them in the one-page report.

Each renderer takes the loaded JSON and, for its picture, the results folder (`results_dir`:
the picture is linked only when it exists there) and the prefix of image links (`link_prefix`,
default: the folder as given). The README links `benchmarks/results/NAME.png`; a report links
relative to its own folder (`text.relative_prefix`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .text import PathLike, failure, image, mib, ms

GPU_PLOT = "gpu_patterns.png"


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
            lines.append(f"| {r['pattern']} | {r['N']:,} | {r['block']} | {failure(r['error'])} | - | - | - |")
            continue
        lines.append(f"| {r['pattern']} | {r['N']:,} | {r['block']} | {r['build_s'] * 1e3:.0f} | {r['nnz_blocks']:,} | "
                     f"{r['layout_bytes'] / 2**20:.1f} | {mib(r.get('peak_build_bytes'))} |")
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
        return failure(message)
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
    failures: dict[tuple[str, str, str], list[str]] = {}
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
            f"{mib(tri.get('fwd_peak_bytes') if tri else None)} | {_num(facts, 'layout_build_ms', '.1f')} | "
            f"{_num(fa, 'create_block_mask_ms', '.1f')} | {errs} |")
        for m, r in got.items():
            for key, stage in (("error", "setup"), ("fwd_error", "fwd"), ("fwd_bwd_error", "fwd+bwd"),
                               ("bwd_error", "bwd")):
                if r and key in r:  # one entry per (method, stage, message): the same error repeats per row
                    failures.setdefault((GPU_METHODS[m], stage, r[key][:160]), []).append(f"{pattern} {n:,}")
    if failures:
        lines += ["", "Failures: " + "; ".join(f"{method} {stage} ({', '.join(where)}): {message}"
                                                for (method, stage, message), where in failures.items()) + "."]
    not_run = [x for p in payloads for x in p.get("not_run", [])]
    if not_run:
        lines += ["", f"Not run (deadline of the run): {', '.join(not_run)}."]
    lines += image("GPU time against length", GPU_PLOT, results_dir, link_prefix)
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
            f"| {r['N']:,} | {r['pattern']} | {r['density']:.4f} | {ms(r['blocked_fwd_s'])} | {ms(r.get('flex_fwd_s'))} | "
            f"{ratio} | {ms(r.get('sdpa_mask_fwd_s'))} | {ms(r.get('blocked_fwd_bwd_s'))} | "
            f"{ms(r['blocked_first_call_s'])} | {first_flex} | {r['effective_tflops']:.3f} | "
            f"{mib(r.get('blocked_peak_beyond_inputs_bytes'))} | {r['blocked_max_err']:.1e} |")
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
                cells += ["skip" if (name, n) in skipped else (failure(r["error"]) if r and "error" in r else "-"), "-"]
            else:
                cells += [f"{r['seconds'] * 1e3:.0f}", mib(r.get("peak_bytes"))]
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
    lines += image("fidelity", "fidelity.png", results_dir, link_prefix)
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
    lines += image(name, f"{name}.png", results_dir, link_prefix)
    return "\n".join(lines)


def block_topk_gpu_table(data: dict, *, results_dir: PathLike | None = None, link_prefix: str | None = None) -> str:
    env = data["env"]
    lines = [
        (f"**Block top-k on the GPU** (`PYTHONPATH=src python3 benchmarks/gpu_block_topk.py`; {data['setup']}; "
         f"{env.get('gpu', env['device'])}, torch {env['torch']}, triton {env.get('triton', '-')}). ms per call "
         "(median); end to end = selection + layout + plan + triton kernel, what `block_topk_attention` costs; "
         "old = the layout from the selection table and the plan with its backward walk (before issue #16), "
         "new = the layout and plan built on the device with no host read; select: the selection kernel "
         "(ops/topk/select_kernel.py, the default on CUDA), and the same selection by torch ops where measured "
         "(bit-equal: `select_kernel_equals_torch_ops`); e2e / kernel: issue #16's goal is <= 1.10."),
        "",
        ("| N | blocks kept | select (torch ops) | layout old / new | layout (via pattern) | plan old / new | kernel | "
         "end to end fwd old / new | new e2e / kernel | SDPA causal fwd | speed-up | end to end fwd+bwd | "
         "SDPA causal fwd+bwd | speed-up |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "device_path" not in r:  # a file from before issue #16: its layout, plan and end to end were the old path
            r = {**r, "old_layout_ms": r.get("layout_ms"), "old_plan_ms": r.get("plan_ms"),
                 "old_end_to_end_ms": r.get("triton_end_to_end_ms"), "layout_ms": None, "plan_ms": None,
                 "triton_end_to_end_ms": None}

        def file_ms(key, r=r):  # the file holds milliseconds
            return "-" if r.get(key) is None else f"{r[key]:.2f}"

        def ratio(key, r=r):
            return "-" if r.get(key) is None else f"{r[key]:.2f}x"

        select = file_ms("select_ms")
        if r.get("select_torch_ops_ms") is not None:
            select += f" ({file_ms('select_torch_ops_ms')})"
        lines.append(
            f"| {r['N']:,} | {r['top_k_blocks']}/{r['kv_blocks']} ({100 * r['selected_pairs_fraction']:.1f}% of pairs) "
            f"| {select} | {file_ms('old_layout_ms')} / {file_ms('layout_ms')} | "
            f"{file_ms('layout_via_pattern_ms')} | "
            f"{file_ms('old_plan_ms')} / {file_ms('plan_ms')} | {file_ms('kernel_ms')} | "
            f"{file_ms('old_end_to_end_ms')} / {file_ms('triton_end_to_end_ms')} | {ratio('new_end_to_end_over_kernel')} | "
            f"{file_ms('sdpa_causal_ms')} | {ratio('speedup_vs_sdpa_causal')} | {file_ms('triton_end_to_end_fwd_bwd_ms')} | "
            f"{file_ms('sdpa_causal_fwd_bwd_ms')} | {ratio('speedup_vs_sdpa_causal_fwd_bwd')} |")
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
    lines += image(name, f"{name}.png", results_dir, link_prefix)
    return "\n".join(lines)


def _with_backward(r: dict | None, derive: bool = False) -> dict | None:
    """The row with `bwd_ms` = forward+backward - forward (marked `bwd_derived`) where the
    backward alone was not timed, or everywhere with `derive` (so two rows compare alike)."""
    if r is None or ("bwd_ms" in r and not derive) or "fwd_ms" not in r or "fwd_bwd_ms" not in r:
        return r
    return {**r, "bwd_ms": r["fwd_bwd_ms"] - r["fwd_ms"], "bwd_derived": True}


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
             "`torch.autograd.grad` over one kept forward graph, the backward alone; marked * where that could not "
             "be timed and the backward is forward+backward - forward). ms, median; `FA / ours` above 1 = we are "
             "faster.",
             "",
             "| pattern | N | fwd ours | fwd FlexAttention | fwd FA / ours | fwd FLASH backend | bwd ours "
             "| bwd FlexAttention | bwd FA / ours | bwd FLASH backend |",
             "|" + "---|" * 10]
    for pattern, n in timed:
        got = [rows.get((pattern, n, m)) for m in ("sparse_attn_triton", "flexattention", "flexattention_flash")]
        derive = any(r is not None and "bwd_ms" not in r for r in got[:2])  # ours and FlexAttention alike
        tri, fa, fl = (_with_backward(r, derive) for r in got)

        def bwd(r):
            return _gpu_ms(r, "bwd") + ("*" if r and r.get("bwd_derived") else "")

        lines.append(f"| {pattern} | {n:,} | {_gpu_ms(tri, 'fwd')} | {_gpu_ms(fa, 'fwd')} | {_ratio(fa, tri, 'fwd')} | "
                     f"{_gpu_ms(fl, 'fwd')} | {bwd(tri)} | {bwd(fa)} | {_ratio(fa, tri, 'bwd')} | {bwd(fl)} |")
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

