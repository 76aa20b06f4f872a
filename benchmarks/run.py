"""Run every benchmark in one process and write ``results/`` (JSON, latest.md, PNG plots).

    python -m benchmarks.run                 # full run (about 15-20 min on 2 idle cores)
    python -m benchmarks.run --quick         # smoke run: small sizes, few rounds (about 1-2 min)
    python -m benchmarks.run --out /tmp/x --threads 1 --only forward,grid

Blocks (``--only``): forward, tiny, grid, cells, length, profile, memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks import baselines as B  # noqa: E402
from benchmarks import workloads as W  # noqa: E402
from benchmarks.harness import Item, interleave, loadavg, machine_info, paired_difference, paired_ratio  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def pin_trace_sources() -> None:
    """Read now the source files whose ``with model.trace(...)`` bodies nnsight will compile.

    nnsight reads a file's text the first time one of its traces runs and compiles the block
    at the line the running code says; if the file was edited after import (another
    engineer saving ``scope.py`` mid-run), the lines no longer match and the trace fails.
    Reading them right after import pins the text that matches the loaded code."""
    from nnsight.tracing.tracer import Tracer

    import superscopes.graph
    import superscopes.scope

    for module in (superscopes.scope, superscopes.graph, B):
        Tracer.source(module.__file__)


pin_trace_sources()

BLOCKS = ["forward", "tiny", "grid", "cells", "length", "profile", "memory"]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Context:
    model: object
    sizes: W.Sizes
    threads: int
    quick: bool


def _timings(result: dict) -> dict:
    return {name: timing.as_dict() for name, timing in result.items()}


def _discard(fn):
    """Time ``fn`` but keep nothing it returns (a round's facts would hold e.g. 377 MB of logits)."""

    def run(*args):
        fn(*args)

    return run


def _repeat(fn, times: int):
    """A callable that calls ``fn`` ``times`` times (timed as one; per-call time via ``scale``)."""

    def run(r):
        for _ in range(times):
            fn()

    return run


# ---------------------------------------------------------------- 1-2: floor and nnsight overhead


def block_forward(ctx: Context) -> dict:
    """Plain HF forward / generate vs nnsight traces (none, one read, one patch) on B target rows.

    B=1 runs every contender; the large batch only the two of the 1.15x target."""
    m, s = ctx.model, ctx.sizes
    vector = B.trace_read(m, [W.SOURCE], 3)  # resid_post, layer 3, last source token ("Wales")
    out = {}
    n = s.max_new_tokens
    for batch in [1, s.batch]:
        texts = [W.TARGET] * batch
        vectors = vector.expand(batch, -1).clone()
        alphas = torch.tensor([W.GRID_ALPHAS[i % len(W.GRID_ALPHAS)] for i in range(batch)], dtype=torch.float32)
        every = [
            Item("hf_forward", _discard(lambda r, t=texts: B.hf_forward(m, t))),
            Item(
                "hf_forward_last_logits",
                _discard(lambda r, t=texts: B.hf_forward_last_logits(m, t)),
                note="plain HF forward with logits_to_keep=1 (only the last position unembedded)",
            ),
            Item("trace_none", lambda r, t=texts: B.trace_none(m, t)),
            Item("trace_read", _discard(lambda r, t=texts: B.trace_read(m, t, 3))),
            Item("trace_patch", _discard(lambda r, t=texts, v=vectors, a=alphas: B.trace_patch(m, t, 3, v, a))),
            Item("hf_generate", _discard(lambda r, t=texts: B.hf_generate(m, t, n))),
            Item(
                "nnsight_generate_patch",
                _discard(lambda r, t=texts, v=vectors, a=alphas: B.nnsight_generate_patch(m, t, 3, v, a, n)),
            ),
        ]
        items = every if batch == 1 else [i for i in every if i.name in ("hf_forward", "trace_patch")]
        rounds = s.rounds_small if batch == 1 else s.rounds_batch
        log(f"forward: B={batch}, {rounds} rounds")
        # B=1 warms every code path; the large batch is not warmed again (it costs a full round).
        timings = interleave(items, rounds, warmup=1 if batch == 1 else 0, log=log)
        ratios = {
            f"{name}/hf_forward": paired_ratio(timings[name], timings["hf_forward"])
            for name in timings
            if name.startswith("trace") or name == "hf_forward_last_logits"
        }
        if batch == 1:
            ratios["nnsight_generate_patch/hf_generate"] = paired_ratio(
                timings["nnsight_generate_patch"], timings["hf_generate"]
            )
        out[str(batch)] = {
            "rows": batch,
            "prompt_tokens": len(m.tokenizer(W.TARGET)["input_ids"]),
            "max_new_tokens": n,
            "timings": _timings(timings),
            "ratios": ratios,
        }
    return out


# ---------------------------------------------------------------- tiny model: nnsight's fixed cost


def block_tiny(ctx: Context) -> dict:
    m, s = ctx.model, ctx.sizes
    tiny = W.tiny_model(m.tokenizer)
    texts = [W.TARGET]
    vector = torch.randn(1, tiny.config.hidden_size, generator=torch.Generator().manual_seed(0))
    alpha = torch.tensor([6.0])
    inner = 10  # calls per measurement: single calls of a few ms are too noisy on a shared machine
    items = [
        Item("hf_forward", _repeat(lambda: B.hf_forward(tiny, texts), inner), scale=1 / inner),
        Item("trace_none", _repeat(lambda: B.trace_none(tiny, texts), inner), scale=1 / inner),
        Item("trace_patch", _repeat(lambda: B.trace_patch(tiny, texts, 1, vector, alpha), inner), scale=1 / inner),
    ]
    log(f"tiny: 2-layer Llama d=64, {s.rounds_tiny} rounds x {inner} calls")
    timings = interleave(items, s.rounds_tiny, warmup=2, log=lambda _: None)
    for name, t in timings.items():
        log(f"  {name}: median {t.median * 1e3:.2f} ms")
    return {
        "config": "LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=256, heads 4/2, vocab 49152)",
        "rows": 1,
        "prompt_tokens": len(m.tokenizer(W.TARGET)["input_ids"]),
        "calls_per_round": inner,
        "timings": _timings(timings),
        "overhead_s": {
            "trace_patch-hf_forward": paired_difference(timings["trace_patch"], timings["hf_forward"]),
            "trace_none-hf_forward": paired_difference(timings["trace_none"], timings["hf_forward"]),
        },
    }


# ---------------------------------------------------------------- 3-5: the grid, three ways


def block_grid(ctx: Context) -> dict:
    import superscopes

    m, s = ctx.model, ctx.sizes
    tok = m.tokenizer
    scope = W.grid_scope(s)
    scope_topk = W.with_output(scope, "topk")
    layers, alphas, n_tokens = s.grid_layers, s.grid_alphas, s.max_new_tokens
    n_cells = len(W.GRID_SITES) * len(layers) * len(alphas)
    index = len(tok(W.TARGET)["input_ids"]) - 1  # the placeholder "x" is the target's last token
    assert tok.decode(tok(W.TARGET)["input_ids"][index]).strip() == "x"
    hooks = B.HookScope(m._module, tok)
    hook_texts: dict[tuple, tuple[str, list[int]]] = {}
    lens_top1: dict[tuple, int] = {}
    per_round = len(W.GRID_SITES)  # comparisons 4 and 5 run one site per round (1/3 of the grid)

    def ours(r):
        return superscopes.run(m, scope, progress=False)

    def ours_topk(r):
        return superscopes.run(m, scope_topk, progress=False)

    def hooks_site(site, cell_layers, cell_alphas, record=True):
        cache = hooks.cache(W.SOURCE, [site], cell_layers)
        for layer, alpha in itertools.product(cell_layers, cell_alphas):
            text = hooks.generate_cell(W.TARGET, index, layer, cache[(site, layer)], float(alpha), n_tokens)
            if record:
                hook_texts[(site, layer, float(alpha))] = text

    def lens_site(site, cell_layers, cell_alphas, record=True):
        v = B.read_site(m, W.SOURCE, site, cell_layers)  # [layers, d]
        latents = torch.stack([a * v for a in cell_alphas], dim=1)  # [layers, alphas, d]
        probs = B.lens_site(m, W.TARGET, index, cell_layers, latents)  # [alphas, layers, vocab]
        if record:
            for (i, a), (j, layer) in itertools.product(enumerate(cell_alphas), enumerate(cell_layers)):
                lens_top1[(site, layer, float(a))] = int(probs[i, j].argmax())

    shared_texts: dict[tuple, tuple[str, list[int]]] = {}
    grid_cells = list(itertools.product(W.GRID_SITES, layers, alphas))

    def shared_prefix(cells, record=True):
        texts = hooks.cells_shared_prefix(W.SOURCE, W.TARGET, cells, n_tokens)
        if record:
            shared_texts.update({(s_, l_, float(a_)): t for (s_, l_, a_), t in zip(cells, texts)})

    def floor(r):
        rows = [W.TARGET] * n_cells
        for start in range(0, n_cells, scope.batch_size):
            B.hf_generate(m, rows[start : start + scope.batch_size], n_tokens)

    one_cell = superscopes.Scope(
        W.SOURCE,
        token=W.TOKEN,
        sites=["mlp_out"],
        layers=[layers[0]],
        alphas=[alphas[0]],
        target_layers=["same"],
        max_new_tokens=n_tokens,
    )
    items = [
        Item(
            "ours_generate",
            ours,
            warm=lambda: superscopes.run(m, one_cell, progress=False),
            note="1 read trace + ceil(cells/64) generate traces",
        ),
        Item(
            "hf_generate_floor",
            floor,
            warm=lambda: B.hf_generate(m, [W.TARGET], n_tokens),
            note="plain HF generate of the same target rows, same chunks, no patch, no read",
        ),
        Item(
            "hooks_per_cell",
            lambda r: hooks_site(W.GRID_SITES[r % per_round], layers, alphas),
            scale=per_round,
            warm=lambda: hooks_site("mlp_out", layers[:1], alphas[:1], record=False),
            note="one site per round, x3",
        ),
        Item(
            "lens_per_layer",
            lambda r: lens_site(W.GRID_SITES[r % per_round], layers, alphas),
            scale=per_round,
            warm=lambda: lens_site("mlp_out", layers[:1], alphas[:1], record=False),
            note="one site per round, x3",
        ),
        Item(
            "whatif_shared_prefix",
            lambda r: shared_prefix(grid_cells),
            warm=lambda: shared_prefix(grid_cells[:1], False),
            note="what-if, plain PyTorch: batched like ours, target prefix KV computed once and shared by all rows",
        ),
        Item(
            "ours_topk",
            ours_topk,
            warm=lambda: superscopes.run(m, W.with_output(one_cell, "topk"), progress=False),
            note="superscopes.run with output='topk' (next-token top-10)",
        ),
    ]
    log(f"grid: {n_cells} cells, {n_tokens} new tokens, {per_round} rounds")
    timings = interleave(items, per_round, warmup=1, log=log)

    ours_df = (
        superscopes.run(m, scope, progress=False)
        if timings["ours_generate"].facts is None
        else timings["ours_generate"].facts
    )
    topk_df = timings["ours_topk"].facts
    same_text = same_ids = 0
    mismatches = []
    for row in ours_df.itertuples():
        key = (row.site, row.layer, float(row.alpha))
        text, ids = hook_texts[key]
        same_text += text == row.output
        same_ids += ids == list(row.output_ids)
        if text != row.output and len(mismatches) < 5:
            mismatches.append({"cell": list(key), "ours": row.output, "hooks": text})
    same_shared = sum(shared_texts[(r.site, r.layer, float(r.alpha))][0] == r.output for r in ours_df.itertuples())
    same_top1 = sum(lens_top1[(r.site, r.layer, float(r.alpha))] == r.output_ids[0] for r in topk_df.itertuples())
    total = timings["hooks_per_cell"]
    ratios = {
        "hooks_per_cell/ours_generate": paired_ratio(timings["hooks_per_cell"], timings["ours_generate"]),
        "lens_per_layer/ours_topk": paired_ratio(timings["lens_per_layer"], timings["ours_topk"]),
        "lens_per_layer/ours_generate": paired_ratio(timings["lens_per_layer"], timings["ours_generate"]),
        "ours_generate/hf_generate_floor": paired_ratio(timings["ours_generate"], timings["hf_generate_floor"]),
        "ours_generate/whatif_shared_prefix": paired_ratio(timings["ours_generate"], timings["whatif_shared_prefix"]),
        "hooks_per_cell/whatif_shared_prefix": paired_ratio(timings["hooks_per_cell"], timings["whatif_shared_prefix"]),
    }
    return {
        "cells": n_cells,
        "sites": W.GRID_SITES,
        "layers": layers,
        "alphas": alphas,
        "max_new_tokens": n_tokens,
        "target_tokens": index + 1,
        "batch_size": scope.batch_size,
        "timings": _timings(timings),
        "ratios": ratios,
        "hooks_per_cell_measured_total_s": sum(total.raw),
        "agreement": {
            "hooks_vs_ours_text": [same_text, n_cells],
            "hooks_vs_ours_ids": [same_ids, n_cells],
            "lens_vs_ours_topk_top1": [same_top1, n_cells],
            "whatif_vs_ours_text": [same_shared, n_cells],
            "mismatches": mismatches,
            "examples": [
                {
                    "cell": [r.site, r.layer, r.alpha],
                    "ours": r.output,
                    "hooks": hook_texts[(r.site, r.layer, float(r.alpha))][0],
                }
                for r in ours_df.iloc[:: max(1, n_cells // 4)].itertuples()
            ],
        },
    }


# ---------------------------------------------------------------- scaling curves


def _hook_topk_cells(hooks, cells: list[tuple], target: str, index: int, source: str, position: int = -1):
    sites = sorted({c[0] for c in cells})
    layers = sorted({c[1] for c in cells})
    cache = hooks.cache(source, sites, layers, position)
    return [
        hooks.topk_cell(target, index, layer, cache[(site, layer)], float(alpha))[0] for site, layer, alpha in cells
    ]


def block_cells(ctx: Context) -> dict:
    """Cost vs number of cells: ours (batched, top-k) vs one HF forward per cell with hooks."""
    import superscopes

    m, s = ctx.model, ctx.sizes
    tok = m.tokenizer
    hooks = B.HookScope(m._module, tok)
    index = len(tok(W.SHORT_TARGET)["input_ids"]) - 1
    points = []
    for k, n in enumerate(s.cells):
        scope = W.cells_scope(n)
        cells = list(itertools.product(scope.sites, scope.layers, scope.alphas))
        per_round = min(n, s.baseline_cells_per_round)
        stride = n // per_round
        top1: dict[tuple, int] = {}

        def baseline(r, cells=cells, stride=stride, top1=top1):
            sample = cells[r % stride :: stride]
            for cell, ids in zip(sample, _hook_topk_cells(hooks, sample, W.SHORT_TARGET, index, W.SOURCE)):
                top1[cell] = ids[0]

        items = [
            Item("ours_topk", lambda r, sc=scope: superscopes.run(m, sc, progress=False)),
            Item(
                "hooks_per_cell_topk",
                baseline,
                scale=stride,
                note="" if stride == 1 else f"{per_round} of {n} cells per round (every {stride}th), x{stride}",
            ),
        ]
        log(f"cells: n={n}, {s.rounds_curve} rounds" + (f" (baseline samples 1/{stride})" if stride > 1 else ""))
        timings = interleave(items, s.rounds_curve, warmup=1 if k == 0 else 0, log=log)
        df = timings["ours_topk"].facts
        agree = sum(
            top1[(r.site, r.layer, r.alpha)] == r.output_ids[0]
            for r in df.itertuples()
            if (r.site, r.layer, r.alpha) in top1
        )
        points.append(
            {
                "cells": n,
                "target_tokens": index + 1,
                "baseline_sampled": stride > 1,
                "baseline_cells_per_round": per_round,
                "timings": _timings(timings),
                "ratio": paired_ratio(timings["hooks_per_cell_topk"], timings["ours_topk"]),
                "top1_agreement": [agree, len(top1)],
            }
        )
    return {"target": W.SHORT_TARGET, "points": points}


def block_length(ctx: Context) -> dict:
    """Cost vs prompt length: back-patching into the source prompt itself (both passes grow)."""
    import superscopes

    m, s = ctx.model, ctx.sizes
    tok = m.tokenizer
    hooks = B.HookScope(m._module, tok)
    points = []
    for k, length in enumerate(s.lengths):
        text = W.text_of_length(tok, length)
        n_tokens = len(tok(text)["input_ids"])
        scope = W.length_scope(text, s.length_alphas)
        cells = [("resid_post", 3, a) for a in s.length_alphas]
        n_cells = len(cells)
        items = [
            Item("ours_topk", lambda r, sc=scope: superscopes.run(m, sc, progress=False)),
            Item(
                "hooks_per_cell_topk",
                _discard(lambda r, t=text, n=n_tokens, c=cells: _hook_topk_cells(hooks, c, t, n - 1, t)),
            ),
            Item(
                "hf_forward_floor",
                _discard(lambda r, t=text, n=n_cells: (B.hf_forward(m, [t]), B.hf_forward(m, [t] * n))),
                note="plain HF forward of the source row and the target rows",
            ),
        ]
        log(f"length: {n_tokens} tokens, {n_cells} cells, {s.rounds_curve} rounds")
        timings = interleave(items, s.rounds_curve, warmup=1 if k == 0 else 0, log=log)
        points.append(
            {
                "tokens": n_tokens,
                "cells": n_cells,
                "timings": _timings(timings),
                "ratios": {
                    "ours_topk/hf_forward_floor": paired_ratio(timings["ours_topk"], timings["hf_forward_floor"]),
                    "hooks_per_cell_topk/ours_topk": paired_ratio(timings["hooks_per_cell_topk"], timings["ours_topk"]),
                },
            }
        )
    return {"alphas": s.length_alphas, "site": "resid_post", "layer": 3, "points": points}


# ---------------------------------------------------------------- profile and memory


def block_profile(ctx: Context) -> dict:
    import superscopes
    from benchmarks.profiling import breakdown, cprofile

    m = ctx.model
    scope = W.grid_scope(ctx.sizes)
    log("profile: category breakdown of one grid run")
    categories = breakdown(m, lambda: superscopes.run(m, scope, progress=False))
    log(f"  total {categories['total_s']:.2f}s: " + ", ".join(f"{k} {v:.2f}" for k, v in categories["seconds"].items()))
    log("profile: cProfile of one grid run")
    profile = cprofile(lambda: superscopes.run(m, scope, progress=False))
    return {
        "cells": len(scope.sites) * len(scope.layers) * len(scope.alphas),
        "breakdown": categories,
        "cprofile": profile,
    }


def block_memory(ctx: Context) -> dict:
    s = ctx.sizes
    configs = [{"kind": "cells", "cells": n, "batch_size": 64} for n in s.memory_cells]
    configs += [{"kind": "cells", "cells": 64, "batch_size": b} for b in s.memory_batch_sizes]
    configs += [{"kind": "length", "tokens": n, "alphas": s.length_alphas} for n in s.memory_lengths]
    log(f"memory: {len(configs)} configurations in a separate process (fork per configuration)")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--threads", str(ctx.threads)],
        input=json.dumps(configs),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **MALLOC_ENV},
    )
    for line in proc.stderr.splitlines():
        if line.startswith("  memory"):
            log(line.strip())
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-10:])
        log(f"memory worker failed:\n{tail}")
        return {"error": tail, "configs": configs}
    return {"configs": json.loads(proc.stdout.strip().splitlines()[-1])}


# glibc raises its mmap threshold after large frees, so a buffer freed by an earlier run is
# kept and reused without raising RSS; a fixed threshold returns large buffers to the OS.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

RUNNERS = {
    "forward": block_forward,
    "tiny": block_tiny,
    "grid": block_grid,
    "cells": block_cells,
    "length": block_length,
    "profile": block_profile,
    "memory": block_memory,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--only", default=",".join(BLOCKS), help=f"comma-separated blocks: {','.join(BLOCKS)}")
    args = parser.parse_args(argv)
    selected = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(selected) - set(BLOCKS)
    if unknown:
        parser.error(f"unknown block(s) {', '.join(sorted(unknown))}; choose from {', '.join(BLOCKS)}")

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    meta = machine_info(args.threads, REPO)
    meta.update(
        quick=args.quick,
        blocks=selected,
        loadavg_start=loadavg(),
        command="python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    log(f"{meta['cpu_model']}, {meta['cpu_cores']} cores, torch threads {args.threads}, load {meta['loadavg_start']}")

    import superscopes
    from superscopes.models import DEFAULT_MODEL

    model = superscopes.load(DEFAULT_MODEL)
    meta["model"] = DEFAULT_MODEL
    meta["model_load_s"] = time.perf_counter() - started
    ctx = Context(model, W.QUICK if args.quick else W.FULL, args.threads, args.quick)
    results: dict = {"meta": meta}
    with torch.inference_mode():
        for name in BLOCKS:
            if name not in selected:
                continue
            block_start = time.perf_counter()
            load_before = loadavg()
            results[name] = RUNNERS[name](ctx)
            results[name]["block"] = {
                "seconds": time.perf_counter() - block_start,
                "loadavg_start": load_before,
                "loadavg_end": loadavg(),
            }
    meta["loadavg_end"] = loadavg()
    meta["duration_s"] = time.perf_counter() - started

    from benchmarks import report

    report.write(results, args.out)
    log(f"done in {meta['duration_s']:.0f}s; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
