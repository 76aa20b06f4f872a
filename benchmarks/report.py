"""Write the results: one JSON per block, ``run.json``, ``latest.md`` and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GOALS = {
    "patch_b1": 1.15,
    "patch_bn": 1.15,
    "tiny_ms": 3.0,
    "grid_vs_hooks": 8.0,
    "grid_vs_lens": 1.0,
    "memory_ratio": 1.25,
}


# ---------------------------------------------------------------- formatting


def fs(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fr(ratio: dict | None, digits: int = 2) -> str:
    if not ratio:
        return "n/a"
    return f"{ratio['median']:.{digits}f}x ({ratio['min']:.{digits}f}-{ratio['max']:.{digits}f})"


def frc(ratio: dict | None, digits: int = 2) -> str:
    """Wall-clock ratio, then the CPU-time ratio."""
    if not ratio:
        return "n/a"
    cpu = ratio.get("cpu")
    return fr(ratio, digits) + (f"; CPU {cpu['median']:.{digits}f}x" if cpu else "")


def timing_cell(t: dict) -> str:
    return f"{fs(t['median_s'])} ({fs(t['min_s'])} - {fs(t['max_s'])})"


def cpu_cell(t: dict) -> str:
    return fs(t.get("cpu_median_s"))


def _verdict(ok: bool | None) -> str:
    return {True: "**pass**", False: "**miss**", None: "not run"}[ok]


def _title(meta: dict) -> str:
    return f"SmolLM2-135M on {meta['cpu_model']} ({meta['cpu_cores']} cores, {meta['torch_threads']} torch thread(s))"


# ---------------------------------------------------------------- targets


def _memory_points(results: dict) -> list[dict]:
    memory = results.get("memory", {})
    return [c for c in memory.get("configs", []) if "peak_delta_mb" in c]


def _row(target: str, goal: str, wall: str, cpu: str, ok, ok_cpu, value=None) -> dict:
    return {
        "target": target,
        "goal": goal,
        "measured": wall,
        "measured_cpu": cpu,
        "ok": ok,
        "ok_cpu": ok_cpu,
        "value": value,
    }


def targets(results: dict) -> list[dict]:
    """Each target with its wall-clock measurement and verdict, and the same on CPU time."""
    rows = []
    forward = results.get("forward")
    sizes = sorted(int(k) for k in forward if k.isdigit()) if forward else []
    if forward:
        for key in (str(sizes[0]), str(sizes[-1])):
            r = forward[key]["ratios"]["trace_patch/hf_forward"]
            goal = GOALS["patch_b1"]
            rows.append(
                _row(
                    f"nnsight trace with one patch, B={key}, vs plain HF forward of the same rows",
                    f"<= {goal:.2f}x",
                    fr(r, 3),
                    fr(r["cpu"], 3),
                    r["median"] <= goal,
                    r["cpu"]["median"] <= goal,
                    r["median"],
                )
            )
    else:
        rows.append(_row("patched forward vs plain forward (B=1, B=64)", "<= 1.15x", "n/a", "n/a", None, None))
    tiny = results.get("tiny")
    if tiny:
        d = tiny["overhead_s"]["trace_patch-hf_forward"]
        t = tiny["timings"]["hf_forward"]

        def ms(x):
            return f"{x['median'] * 1e3:.2f} ms ({x['min'] * 1e3:.2f} - {x['max'] * 1e3:.2f})"

        rows.append(
            _row(
                "nnsight overhead of a trace with one patch, 2-layer tiny Llama (d=64, vocab 49152), B=1",
                f"<= {GOALS['tiny_ms']:.0f} ms",
                f"{ms(d)} over {fs(t['median_s'])}",
                f"{ms(d['cpu'])} over {fs(t['cpu_median_s'])}",
                d["median"] * 1e3 <= GOALS["tiny_ms"],
                d["cpu"]["median"] * 1e3 <= GOALS["tiny_ms"],
                d["median"] * 1e3,
            )
        )
    else:
        rows.append(_row("tiny-model nnsight overhead", "<= 3 ms", "n/a", "n/a", None, None))
    grid = results.get("grid")
    if grid:
        r = grid["ratios"]["hooks_per_cell/ours_generate"]
        goal = GOALS["grid_vs_hooks"]
        rows.append(
            _row(
                f"grid ({grid['cells']} cells, generate) speed-up over per-cell hooks + generate (comparison 4)",
                f">= {goal:.0f}x",
                fr(r),
                fr(r["cpu"]),
                r["median"] >= goal,
                r["cpu"]["median"] >= goal,
                r["median"],
            )
        )
        r = grid["ratios"]["lens_per_layer/ours_topk"]
        r2 = grid["ratios"]["lens_per_layer/ours_generate"]
        rows.append(
            _row(
                "grid speed-up over one trace per layer with full-vocab output (comparison 5), like for like: ours with "
                f"output='topk' (and, in brackets, ours generating {grid['max_new_tokens']} tokens)",
                "> 1x",
                f"{fr(r)} [{fr(r2)}]",
                f"{fr(r['cpu'])} [{fr(r2['cpu'])}]",
                r["median"] > 1,
                r["cpu"]["median"] > 1,
                r["median"],
            )
        )
    else:
        rows.append(_row("grid vs comparisons 4 and 5", ">= 8x, > 1x", "n/a", "n/a", None, None))
    points = [p for p in _memory_points(results) if p["kind"] == "cells" and p.get("batch_size") == 64]
    by_cells = {p["cells"]: p for p in points}
    # From 128 cells on, a grid runs in several passes of 64 rows: bounded means flat from there.
    # (One pass, 64 cells, peaks lower: no later pass allocates while its results are held.)
    if 128 in by_cells and max(by_cells) > 128:
        big, ref = by_cells[max(by_cells)], by_cells[128]
        ratio = big["peak_delta_mb"] / max(ref["peak_delta_mb"], 1e-9)
        one_pass = f"; 64 cells, one pass: {by_cells[64]['peak_delta_mb']:.0f} MB" if 64 in by_cells else ""
        rows.append(
            _row(
                f"grid peak memory bounded by batch size: {max(by_cells)} cells vs 128 cells at batch_size=64",
                f"<= {GOALS['memory_ratio']:.2f}x (cells x{max(by_cells) // 128})",
                f"{ratio:.2f}x ({big['peak_delta_mb']:.0f} MB vs {ref['peak_delta_mb']:.0f} MB{one_pass})",
                "-",
                ratio <= GOALS["memory_ratio"],
                None,
                ratio,
            )
        )
    else:
        rows.append(
            _row(
                "grid peak memory bounded by batch size",
                "<= 1.25x from 128 to 512 cells",
                "n/a (needs the 128- and 512-cell memory points: full run)",
                "-",
                None,
                None,
            )
        )
    return rows


# ---------------------------------------------------------------- what the numbers say


def reading(results: dict) -> list[str]:
    """A few sentences computed from this run's numbers (only for the blocks that ran)."""
    out = []
    forward, tiny, grid, profile = (results.get(k) for k in ("forward", "tiny", "grid", "profile"))
    if forward:
        sizes = sorted(int(k) for k in forward if k.isdigit())
        parts = [f"{forward[str(b)]['ratios']['trace_patch/hf_forward']['median']:.2f}x at B={b}" for b in sizes]
        last = forward[str(sizes[0])]["ratios"].get("hf_forward_last_logits/hf_forward")
        line = (
            f"- nnsight's overhead is small: a trace with one patch costs {' and '.join(parts)} of a plain HF forward"
        )
        if tiny:
            line += (
                f"; on the tiny model the fixed cost is {tiny['overhead_s']['trace_patch-hf_forward']['cpu']['median'] * 1e3:.1f} ms "
                "of CPU time per trace"
            )
        out.append(line + ".")
        if last:
            out.append(
                f"- Unembedding only the last position (`logits_to_keep=1`) makes the plain forward of the "
                f"{forward[str(sizes[0])]['prompt_tokens']}-token target {last['median']:.2f}x as long: the "
                "next-token (topk) paths compute the full-vocabulary logits of every position and keep one."
            )
    if grid:
        r = grid["ratios"]
        line = (
            f"- The grid costs {r['ours_generate/hf_generate_floor']['median']:.2f}x plain HF generate of the same rows"
        )
        if profile:
            share = profile["breakdown"]["share"]["model forward"] * 100
            line += f", and {share:.1f}% of its time is the model's own forward (profile)"
        out.append(
            line + f". Its {r['hooks_per_cell/ours_generate']['median']:.1f}x over comparison 4 comes from batching "
            "alone; on a CPU the prompt pass is compute-bound, so running the same target prompt for every "
            "row costs nearly as much batched as one by one, and batching pays off in the decode steps."
        )
        out.append(
            f"- The what-if (a hand-written target prefix computed once, KV cache shared) produced the same "
            f"texts ({grid['agreement']['whatif_vs_ours_text'][0]}/{grid['agreement']['whatif_vs_ours_text'][1]}); "
            f"ours took {r['ours_generate/whatif_shared_prefix']['median']:.2f}x its time, comparison 4 "
            f"{r['hooks_per_cell/whatif_shared_prefix']['median']:.1f}x."
        )
        out.append(
            f"- Comparison 5 (one trace per layer, batches of {len(grid['alphas'])} rows) takes "
            f"{r['lens_per_layer/ours_topk']['median']:.2f}x as long as ours in topk mode: its traces are compute-bound "
            f"too; ours generating {grid['max_new_tokens']} tokens takes "
            f"{1 / r['lens_per_layer/ours_generate']['median']:.2f}x comparison 5's single next-token readout."
        )
    points = {(p["cells"], p["batch_size"]): p for p in _memory_points(results) if p["kind"] == "cells"}
    if (64, 64) in points:
        line = f"- Peak extra memory: {points[(64, 64)]['peak_delta_mb']:.0f} MB at 64 cells"
        big = max((c for c, b in points if b == 64), default=64)
        if big > 64:
            line += f", {points[(big, 64)]['peak_delta_mb']:.0f} MB at {big} cells"
        small = [(b, p) for (c, b), p in points.items() if c == 64 and b != 64]
        for b, p in small:
            line += f", {p['peak_delta_mb']:.0f} MB at batch_size {b}"
        cells = results.get("cells")
        tokens = cells["points"][0]["target_tokens"] if cells else 10
        logits = 64 * tokens * 49152 * 4 / 2**20
        out.append(
            line + f": it follows the batch size. Much of it is the full logits of a pass "
            f"(64 rows x {tokens} positions x 49152 x 4 bytes = {logits:.0f} MB)."
        )
    return out


# ---------------------------------------------------------------- markdown


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Superscopes benchmarks",
        "",
        f"Generated by `{meta['command'].strip()}` on {meta['date_utc']} in {meta['duration_s'] / 60:.1f} min"
        + (" (**--quick**: small sizes, few rounds; not for quoting)" if meta["quick"] else "")
        + ".",
        "",
        "| machine | |",
        "| --- | --- |",
        f"| CPU | {meta['cpu_model']}, {meta['cpu_cores']} cores, {meta['memory_gb']} GB RAM |",
        f"| torch threads | {meta['torch_threads']} (`torch.set_num_threads`) |",
        f"| versions | torch {meta['torch']}, nnsight {meta['nnsight']}, transformers {meta['transformers']}, "
        f"Python {meta['python']} |",
        f"| model | {meta['model']} (SmolLM2-135M-Instruct, float32, CPU) |",
        f"| load average (1/5/15 min) | start {meta['loadavg_start']}, end {meta['loadavg_end']} |",
        f"| git | {meta['git_commit']} |",
        "",
        "Method: every block runs its contenders in one process, interleaved (A B C, then C B A, ...) "
        "after a warm-up pass, under `torch.inference_mode()`; `gc.collect()` before each measurement, "
        "outside the timed region. Times are median (min - max) over rounds; a ratio is the median "
        "(min - max) of the per-round ratios of two contenders that ran back to back, which cancels "
        "most of the drift of a shared machine. Each measurement also records the process's CPU time "
        "(`time.process_time()`, all its threads): with one torch thread it equals the wall time on an idle "
        "machine, and it stays close to the work done when other processes compete for the cores. "
        "Tokenisation is included on both sides (an nnsight trace given text tokenises it).",
        "",
        "## Targets",
        "",
        "Verdicts on wall-clock time (what a user waits for), and on process CPU time (the work done, which "
        "other processes on the machine disturb much less).",
        "",
        "| target | goal | measured (wall) | verdict | measured (CPU time) | verdict (CPU) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in targets(results):
        cpu_verdict = "-" if row["measured_cpu"] == "-" else _verdict(row["ok_cpu"])
        lines.append(
            f"| {row['target']} | {row['goal']} | {row['measured']} | {_verdict(row['ok'])} | "
            f"{row['measured_cpu']} | {cpu_verdict} |"
        )
    lines.append("")
    notes = reading(results)
    if notes:
        lines += ["## Reading", ""] + notes + [""]

    forward = results.get("forward")
    if forward:
        lines += [
            "## 1-2. The floor and nnsight's overhead",
            "",
            f"Rows: the entity-description target ({forward['1']['prompt_tokens']} tokens). Patch: the last token "
            "of block 3's output becomes alpha * v (v read from the source's last token). Generation: "
            f"{forward['1']['max_new_tokens']} greedy tokens, patch on the prompt pass.",
            "",
            "| rows | contender | time | CPU time | vs plain HF (wall; CPU) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for key, block in forward.items():
            if key == "block":
                continue
            for name, t in block["timings"].items():
                ratio = block["ratios"].get(f"{name}/hf_forward") or (
                    block["ratios"].get(f"{name}/hf_generate") if name == "nnsight_generate_patch" else None
                )
                base = "1 (floor)" if name in ("hf_forward", "hf_generate") else frc(ratio, 3)
                lines.append(f"| {key} | {name} | {timing_cell(t)} | {cpu_cell(t)} | {base} |")
        lines.append("")

    tiny = results.get("tiny")
    if tiny:
        lines += [
            "## nnsight's fixed cost on a tiny model",
            "",
            f"{tiny['config']}, random weights, SmolLM2's tokenizer, 1 row of {tiny['prompt_tokens']} tokens; "
            f"each round times {tiny['calls_per_round']} calls. Overhead = per-round difference to the plain forward.",
            "",
            "| contender | time per call | CPU time per call | overhead (wall) | overhead (CPU) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, t in tiny["timings"].items():
            d = tiny["overhead_s"].get(f"{name}-hf_forward")
            over = over_cpu = "-"
            if d is not None:
                over = f"{d['median'] * 1e3:.2f} ms ({d['min'] * 1e3:.2f} - {d['max'] * 1e3:.2f})"
                c = d["cpu"]
                over_cpu = f"{c['median'] * 1e3:.2f} ms ({c['min'] * 1e3:.2f} - {c['max'] * 1e3:.2f})"
            lines.append(f"| {name} | {timing_cell(t)} | {cpu_cell(t)} | {over} | {over_cpu} |")
        lines.append("")

    grid = results.get("grid")
    if grid:
        a = grid["agreement"]
        lines += [
            "## 3-5. The Superscopes grid, three ways",
            "",
            f'Source "Diana, Princess of Wales", token "Wales"; {len(grid["sites"])} sites {grid["sites"]} x '
            f"{len(grid['layers'])} layers {grid['layers']} x {len(grid['alphas'])} alphas {grid['alphas']} = "
            f"{grid['cells']} cells; target layer = source layer; entity-description target "
            f'({grid["target_tokens"]} tokens) patched on "x"; {grid["max_new_tokens"]} greedy tokens; '
            f"batch_size {grid['batch_size']}.",
            "",
            "| # | contender | what runs | time (whole grid) | CPU time | ours is faster by (wall; CPU) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        labels = {
            "ours_generate": ("3", "superscopes.run(output='generate')"),
            "hf_generate_floor": ("1", "plain HF generate of the same rows (floor, no read, no patch)"),
            "hooks_per_cell": ("4", "authors' approach: HF hooks, one generate per cell"),
            "lens_per_layer": (
                "5",
                "nnterp-style patchscope_lens: one trace per layer, full-vocab probs (equivalent code)",
            ),
            "ours_topk": ("3'", "superscopes.run(output='topk')"),
            "whatif_shared_prefix": (
                "what-if",
                "plain-PyTorch prototype: batched like 3, and the target's prefix "
                "(all but the placeholder) computed once, its KV cache shared by all rows",
            ),
        }
        ratio_for = {
            "hooks_per_cell": grid["ratios"]["hooks_per_cell/ours_generate"],
            "lens_per_layer": grid["ratios"]["lens_per_layer/ours_topk"],
        }
        for name, t in grid["timings"].items():
            number, what = labels.get(name, ("", name))
            note = f" [{t['note']}]" if t["note"] and t["scale"] != 1 else ""
            speed = (
                frc(ratio_for[name]) + (" (vs 3')" if name == "lens_per_layer" else " (vs 3)")
                if name in ratio_for
                else "-"
            )
            if name == "hf_generate_floor":
                speed = f"ours / floor = {frc(grid['ratios']['ours_generate/hf_generate_floor'])}"
            if name == "whatif_shared_prefix":
                speed = f"ours / what-if = {frc(grid['ratios']['ours_generate/whatif_shared_prefix'])}"
            lines.append(f"| {number} | {name} | {what}{note} | {timing_cell(t)} | {cpu_cell(t)} | {speed} |")
        lines += [
            "",
            f"Comparisons 4 and 5 run one site (a third of the grid) per round, interleaved with the whole grid of "
            f"3 and 3'; their times are that round's time x3, and over the rounds every cell runs once "
            f"(measured total of comparison 4: {fs(grid['hooks_per_cell_measured_total_s'])}).",
            "",
            f"Agreement: greedy texts of comparison 4 equal ours in {a['hooks_vs_ours_text'][0]}/{a['hooks_vs_ours_text'][1]} "
            f"cells (token ids: {a['hooks_vs_ours_ids'][0]}/{a['hooks_vs_ours_ids'][1]}); the top-1 next token of "
            f"comparison 5 equals ours (topk) in {a['lens_vs_ours_topk_top1'][0]}/{a['lens_vs_ours_topk_top1'][1]} cells; "
            f"the what-if's texts equal ours in {a['whatif_vs_ours_text'][0]}/{a['whatif_vs_ours_text'][1]} cells.",
            "",
            f"The what-if (the plain-PyTorch shared-prefix prototype that preceded the graph's own shared prefix) runs "
            f"{frc(grid['ratios']['hooks_per_cell/whatif_shared_prefix'])} faster than comparison 4, ours "
            f"{frc(grid['ratios']['hooks_per_cell/ours_generate'])} (see the what-if in benchmarks/README.md). "
            "![grid](grid.png)",
            "",
            "| cell (site, layer, alpha) | ours | authors' hooks |",
            "| --- | --- | --- |",
        ]
        for ex in a["examples"] + a["mismatches"]:
            lines.append(f"| {tuple(ex['cell'])} | {json.dumps(ex['ours'])} | {json.dumps(ex['hooks'])} |")
        lines += [
            "",
            "Comparison 5: nnterp 1.3.0 (the current release) was downloaded and read; its `patchscope_lens` runs one "
            "trace per layer over the target rows, writes the latents into that layer's output at the patch index and "
            "saves `logits[:, -1].softmax(-1)` (the full vocabulary). It cannot be used here: it imports "
            "`nnsight.intervention.tracing`, which nnsight 0.8.1 no longer has (ModuleNotFoundError), so "
            "`benchmarks/baselines.py::lens_site` is the same code written against nnsight 0.8.1. It is given the "
            "most favourable batching its API allows (the 6 alphas as 6 source rows, one call per site, the "
            "source vectors read in one trace per site).",
            "",
        ]

    cells = results.get("cells")
    if cells:
        lines += [
            "## Scaling: number of cells",
            "",
            f"Next-token top-k on a short target ({json.dumps(cells['target'])}, {cells['points'][0]['target_tokens']} "
            "tokens), target layer = source layer, batch_size 64. Per-cell baseline: the authors' hooks, one HF "
            "forward per cell. ![cells](cells.png)",
            "",
            "| cells | ours (batched) | per-cell hooks | ours is faster by (wall; CPU) | top-1 agreement |",
            "| --- | --- | --- | --- | --- |",
        ]
        for p in cells["points"]:
            t = p["timings"]
            sampled = " (sampled)" if p["baseline_sampled"] else ""
            lines.append(
                f"| {p['cells']} | {timing_cell(t['ours_topk'])} | {timing_cell(t['hooks_per_cell_topk'])}{sampled} | "
                f"{frc(p['ratio'])} | {p['top1_agreement'][0]}/{p['top1_agreement'][1]} |"
            )
        if any(p["baseline_sampled"] for p in cells["points"]):
            lines.append("")
            lines.append(
                "(sampled): the baseline ran an evenly spaced sample of the cells each round (a different "
                "sample per round), times scaled to all cells; every cell costs the same forward."
            )
        lines.append("")

    length = results.get("length")
    if length:
        lines += [
            "## Scaling: prompt length",
            "",
            f"A prose prompt of N tokens, {len(length['alphas'])} cells (resid_post, layer {length['layer']}, alphas "
            f"{length['alphas']}), each written back into the prompt itself at its last token (target='source'), "
            "next-token top-k: both the read and the patch pass grow with N. ![length](length.png)",
            "",
            "| tokens | ours | per-cell hooks | plain HF floor | ours / floor (wall; CPU) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for p in length["points"]:
            t = p["timings"]
            lines.append(
                f"| {p['tokens']} | {timing_cell(t['ours_topk'])} | {timing_cell(t['hooks_per_cell_topk'])} | "
                f"{timing_cell(t['hf_forward_floor'])} | {frc(p['ratios']['ours_topk/hf_forward_floor'])} |"
            )
        lines.append("")

    memory = results.get("memory")
    if memory:
        lines += ["## Peak memory", ""]
        if "error" in memory:
            lines += [f"The memory worker failed: `{memory['error'][-300:]}`", ""]
        else:
            method = next((c.get("method") for c in memory["configs"] if "method" in c), "?")
            lines += [
                "Method: `python -m benchmarks.memory` loads the model once in a separate process, then forks one "
                "child per configuration; the child runs a one-cell warm-up (so weights and code are resident), "
                f"resets its peak RSS and runs the configuration once ({method}). Reported: peak RSS minus RSS "
                "before the run, i.e. the extra resident memory the run needed. glibc's mmap threshold is fixed "
                "(`MALLOC_MMAP_THRESHOLD_=131072`) so that large buffers freed by the warm-up go back to the OS "
                "instead of hiding the next run's peak. Resolution: a few MB (the kernel updates its RSS counters in "
                "batches), so small configurations can read 0. tracemalloc would not see torch's buffers.",
                "",
                "| configuration | peak extra RSS | RSS before | run time |",
                "| --- | --- | --- | --- |",
            ]
            for c in memory["configs"]:
                if c["kind"] == "cells":
                    label = f"{c['cells']} cells, topk, batch_size {c['batch_size']}"
                else:
                    label = f"prompt of {c.get('tokens_actual', c['tokens'])} tokens, {len(c['alphas'])} cells"
                if "error" in c:
                    lines.append(f"| {label} | error: {c['error']} | | |")
                else:
                    lines.append(
                        f"| {label} | {c['peak_delta_mb']:.0f} MB | {c['rss_before_mb']:.0f} MB | {fs(c['seconds'])} |"
                    )
            lines.append("")

    profile = results.get("profile")
    if profile:
        bd = profile["breakdown"]
        lines += [
            "## Where the grid's time goes",
            "",
            f"One `superscopes.run` of the {profile['cells']}-cell generate grid ({fs(bd['total_s'])} with the "
            "category timers installed). Exclusive time per category (see `benchmarks/profiling.py`):",
            "",
            "| category | time | share | calls |",
            "| --- | --- | --- | --- |",
        ]
        for cat, sec in bd["seconds"].items():
            lines.append(f"| {cat} | {fs(sec)} | {bd['share'][cat] * 100:.1f}% | {bd['calls'][cat]} |")
        cp = profile["cprofile"]
        lines += [
            "",
            f"cProfile of another run ({fs(cp['total_s'])} under the profiler), top functions by own time "
            "(full listing in `profile_grid.txt`):",
            "",
            "| function | calls | own time | cumulative |",
            "| --- | --- | --- | --- |",
        ]
        for row in cp["by_own_time"][:12]:
            lines.append(f"| `{row['function']}` | {row['calls']} | {fs(row['tottime_s'])} | {fs(row['cumtime_s'])} |")
        lines.append("")

    blocks = [(k, v["block"]) for k, v in results.items() if isinstance(v, dict) and "block" in v]
    lines += ["## Run", "", "| block | wall time | load average at start / end |", "| --- | --- | --- |"]
    for name, b in blocks:
        lines.append(f"| {name} | {fs(b['seconds'])} | {b['loadavg_start']} / {b['loadavg_end']} |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _errorbar(ax, xs, timings, label, marker="o", hollow=None):
    """Wall time: median with min-max bars (hollow markers: sampled and scaled); CPU time: dashed."""
    hollow = hollow or [False] * len(xs)
    med = [t["median_s"] for t in timings]
    lo = [t["median_s"] - t["min_s"] for t in timings]
    hi = [t["max_s"] - t["median_s"] for t in timings]
    line = ax.errorbar(xs, med, yerr=[lo, hi], marker="none", capsize=3, label=label)
    color = line[0].get_color()
    for x, y, h in zip(xs, med, hollow):
        ax.plot([x], [y], marker=marker, color=color, markerfacecolor="white" if h else color, linestyle="none")
    if all("cpu_median_s" in t for t in timings):
        ax.plot(
            xs,
            [t["cpu_median_s"] for t in timings],
            linestyle="--",
            marker=marker,
            markersize=3,
            color=color,
            alpha=0.7,
            label=f"{label}, CPU time",
        )


def _memory_axis(ax, points, x_key, xlabel):
    if points:
        xs = [p[x_key] for p in points]
        ax.plot(xs, [p["peak_delta_mb"] for p in points], marker="s", label="ours (batch_size 64)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak extra RSS (MB)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    else:
        ax.text(0.5, 0.5, "memory not measured in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()


def plots(results: dict, out: Path) -> list[str]:
    meta = results["meta"]
    title = _title(meta)
    written = []
    memory = _memory_points(results)
    cells = results.get("cells")
    if cells:
        fig, (ax, mx) = plt.subplots(1, 2, figsize=(12, 4.8))
        xs = [p["cells"] for p in cells["points"]]
        _errorbar(ax, xs, [p["timings"]["ours_topk"] for p in cells["points"]], "superscopes.run (batched)")
        _errorbar(
            ax,
            xs,
            [p["timings"]["hooks_per_cell_topk"] for p in cells["points"]],
            "per-cell hooks (authors')",
            marker="^",
            hollow=[p["baseline_sampled"] for p in cells["points"]],
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cells (next-token top-k)")
        ax.set_ylabel("time (s): wall median, min-max bars; dashed: CPU")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(
            fontsize=8,
            title="hollow: baseline sampled, scaled" if any(p["baseline_sampled"] for p in cells["points"]) else None,
            title_fontsize=8,
        )
        pts = sorted([p for p in memory if p["kind"] == "cells" and p["batch_size"] == 64], key=lambda p: p["cells"])
        _memory_axis(mx, pts, "cells", "cells")
        for p in memory:
            if p["kind"] == "cells" and p["batch_size"] != 64:
                mx.plot(
                    [p["cells"]],
                    [p["peak_delta_mb"]],
                    marker="D",
                    linestyle="none",
                    label=f"batch_size {p['batch_size']}",
                )
        if pts:
            mx.legend()
        fig.suptitle(f"Cost vs number of cells - {title}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "cells.png", dpi=110)
        plt.close(fig)
        written.append("cells.png")
    length = results.get("length")
    if length:
        fig, (ax, mx) = plt.subplots(1, 2, figsize=(12, 4.8))
        xs = [p["tokens"] for p in length["points"]]
        for name, label, marker in [
            ("ours_topk", "superscopes.run", "o"),
            ("hooks_per_cell_topk", "per-cell hooks", "^"),
            ("hf_forward_floor", "plain HF forward (floor)", "v"),
        ]:
            _errorbar(ax, xs, [p["timings"][name] for p in length["points"]], label, marker=marker)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"prompt length (tokens), {length['points'][0]['cells']} cells, target = the prompt itself")
        ax.set_ylabel("time (s): wall median, min-max bars; dashed: CPU")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        pts = sorted([p for p in memory if p["kind"] == "length"], key=lambda p: p["tokens_actual"])
        _memory_axis(mx, pts, "tokens_actual", "prompt length (tokens)")
        fig.suptitle(f"Cost vs prompt length - {title}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "length.png", dpi=110)
        plt.close(fig)
        written.append("length.png")
    grid = results.get("grid")
    if grid:
        fig, ax = plt.subplots(figsize=(9, 3.8))
        names = list(grid["timings"])
        med = [grid["timings"][n]["median_s"] for n in names]
        err = [
            [m - grid["timings"][n]["min_s"] for n, m in zip(names, med)],
            [grid["timings"][n]["max_s"] - m for n, m in zip(names, med)],
        ]
        ax.barh(names, med, xerr=err, capsize=3, color=["C0", "C7", "C3", "C1", "C2", "C0"][: len(names)])
        cpu = [grid["timings"][n].get("cpu_median_s") for n in names]
        if all(c is not None for c in cpu):
            ax.plot(cpu, names, marker="x", color="black", linestyle="none", label="CPU time (median)")
            ax.legend(fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"wall time for the whole {grid['cells']}-cell grid (s), median, min-max bars")
        ax.set_title(f"Superscopes grid - {title}", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "grid.png", dpi=110)
        plt.close(fig)
        written.append("grid.png")
    return written


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    profile = results.get("profile")
    if profile and "text" in profile.get("cprofile", {}):
        (out / "profile_grid.txt").write_text(profile["cprofile"].pop("text"))
    results["targets"] = targets(results)
    for name, value in results.items():
        if name not in ("meta", "targets"):
            (out / f"{name}.json").write_text(json.dumps(value, indent=1, default=str))
    (out / "run.json").write_text(json.dumps(results, indent=1, default=str))
    results["meta"]["plots"] = plots(results, out)
    (out / "latest.md").write_text(markdown(results))
