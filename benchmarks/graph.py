"""The graph with and without its shared-prefix path, side by side, against the compute floor.

    python -m benchmarks.graph              # about 15 min on 2 idle cores
    python -m benchmarks.graph --quick      # smoke run (about 1 min)
    python -m benchmarks.graph --model qwen2.5-coder-1.5b   # the paper grid and peak memory at 1.5B

Every block runs its contenders interleaved (A B C, C B A, ...) in one process, one torch
thread unless said otherwise, after a warm-up; it reports medians with min-max, process CPU
time beside wall time, and paired ratios. Contenders:

- ``shared``: ``superscopes.run`` (default ``share_prefix=True``): the target prompt's tokens
  before the patch run once, every row continues from their KV cache.
- ``unshared``: the same grid with ``share_prefix=False``: every row runs the whole target
  prompt (the graph before the shared prefix).
- ``hooks``: the Superscopes authors' approach, plain HF hooks and one ``generate`` per
  cell (one site per round, scaled x3).
- ``hooks_shared``: the best hand-written HF version: plain hooks, the shared prefix's KV cache
  computed once, all rows in one ``generate`` (block-output writes; the same compute).
- ``floor``: the grid's unavoidable matrix FLOPs (the target prefix once, then per row the
  patched token and each generated token, plus one source forward; linear layers, attention
  scores and the unembedding of positions whose logits are used), run as MLP-shaped one-thread
  float32 GEMMs ([1024 x 576] @ [576 x 1536]). It runs in the same rounds as the others, so
  shared / floor is a paired ratio, not a comparison with a rate measured once.
- ``shared_2threads``: ``shared`` with two torch threads.

With ``--model`` other than the default, only the paper grid runs (the other grids and the cold
start are about the toolkit, not the model), plus the peak memory of a ``shared`` run in a new
process against the bytes of the model's weights. The floor's GEMMs take that model's MLP shape.

Writes ``benchmarks/results/graph.json`` and ``graph.md`` (``graph-<model>.*`` for another model).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks import baselines as B  # noqa: E402
from benchmarks import workloads as W  # noqa: E402
from benchmarks.harness import Item, interleave, loadavg, machine_info, paired_ratio  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[graph {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


DEFAULT_MODEL = "smollm2-135m"


def gemm_shape(config) -> tuple[int, int, int]:
    """An MLP-shaped GEMM of the model: [1024 x d] @ [d x d_ff] (SmolLM2: [1024 x 576] @ [576 x 1536])."""
    return 1024, config.hidden_size, config.intermediate_size


def floor_gemms(flops: float, shape: tuple[int, int, int]):
    """A round of the compute floor: ``flops`` of float32 matmuls of ``shape``."""
    m, k, n = shape
    a, b = torch.randn(m, k), torch.randn(k, n)
    count = max(1, round(flops / (2 * m * k * n)))

    def run(r):
        for _ in range(count):
            a @ b

    return run


def token_flops(config, context: int, logits: bool) -> float:
    """Matrix FLOPs of one token through a Llama-style decoder attending to ``context`` tokens."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    linear = 2 * d * d + 2 * d * kv + 3 * d * f  # q, o; k, v; gate, up, down
    attention = 2 * config.num_attention_heads * head_dim * context  # scores and weighted values
    per_layer = 2 * linear + 2 * attention
    return layers * per_layer + (2 * d * config.vocab_size if logits else 0)


def floor_flops(config, source_tokens: int, target_tokens: int, patch_index: int, rows: int, new_tokens: int) -> float:
    """Unavoidable FLOPs of a generate grid: one source forward (no logits), the target prefix
    once (no logits), then per row the tokens from the patch on and every generated token."""
    total = sum(token_flops(config, t + 1, False) for t in range(source_tokens))
    total += sum(token_flops(config, t + 1, False) for t in range(patch_index))
    per_row = sum(token_flops(config, t + 1, t == target_tokens - 1) for t in range(patch_index, target_tokens))
    per_row += sum(token_flops(config, target_tokens + k + 1, True) for k in range(new_tokens - 1))
    return total + rows * per_row


def _threads(n: int, fn):
    def run(r):
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn(r)
        finally:
            torch.set_num_threads(before)

    return run


def block_paper_grid(model, sizes: W.Sizes, rounds: int) -> dict:
    """The paper's 126-cell grid (1 token x 3 sites x 7 layers x 6 alphas, l* = l, 10 tokens)."""
    import superscopes

    scope = W.grid_scope(sizes)
    unshared = W.replace(scope, share_prefix=False)
    tok = model.tokenizer
    index = len(tok(W.TARGET)["input_ids"]) - 1
    hooks = B.HookScope(model._module, tok)
    hook_texts: dict[tuple, str] = {}
    per_round = len(W.GRID_SITES)

    def hooks_site(site, layers, alphas, record=True):
        cache = hooks.cache(W.SOURCE, [site], layers)
        for layer, alpha in itertools.product(layers, alphas):
            text, _ = hooks.generate_cell(
                W.TARGET, index, layer, cache[(site, layer)], float(alpha), sizes.max_new_tokens
            )
            if record:
                hook_texts[(site, layer, float(alpha))] = text

    cells = list(itertools.product(W.GRID_SITES, scope.layers, scope.alphas))
    hooks_shared_texts: dict[tuple, str] = {}  # resid_post cells only: the hooks write block outputs

    def hooks_shared(chosen, record=True):
        texts = hooks.cells_shared_prefix(W.SOURCE, W.TARGET, chosen, sizes.max_new_tokens, batch_size=len(chosen))
        if record:
            hooks_shared_texts.update({cell: text for cell, (text, _) in zip(chosen, texts) if cell[0] == "resid_post"})

    shape = gemm_shape(model.config)
    source_tokens = len(tok(W.SOURCE)["input_ids"])
    flops = floor_flops(model.config, source_tokens, index + 1, index, len(cells), sizes.max_new_tokens)
    one_cell = W.replace(scope, sites=["mlp_out"], layers=scope.layers[:1], alphas=scope.alphas[:1])
    items = [
        Item(
            "shared",
            lambda r: superscopes.run(model, scope, progress=False),
            warm=lambda: superscopes.run(model, one_cell, progress=False),
        ),
        Item(
            "unshared",
            lambda r: superscopes.run(model, unshared, progress=False),
            warm=lambda: superscopes.run(model, W.replace(one_cell, share_prefix=False), progress=False),
        ),
        Item(
            "hooks",
            lambda r: hooks_site(W.GRID_SITES[r % per_round], scope.layers, scope.alphas),
            scale=per_round,
            warm=lambda: hooks_site("mlp_out", scope.layers[:1], scope.alphas[:1], record=False),
            note="one site per round, x3",
        ),
        Item(
            "hooks_shared",
            lambda r: hooks_shared(cells),
            warm=lambda: hooks_shared(cells[:1], record=False),
            note="plain HF hooks, shared prefix, all rows in one generate",
        ),
        Item("floor", floor_gemms(flops, shape), note=f"{flops / 1e9:.0f} GFLOP of {shape} GEMMs"),
        Item("shared_2threads", _threads(2, lambda r: superscopes.run(model, scope, progress=False))),
    ]
    log(f"paper grid: {rounds} rounds")
    timings = interleave(items, rounds, warmup=1, log=log)
    shared_df = superscopes.run(model, scope, progress=False)
    unshared_df = superscopes.run(model, unshared, progress=False)
    same_as_hooks_shared = sum(
        hooks_shared_texts.get((r.site, r.layer, float(r.alpha))) == r.output for r in shared_df.itertuples()
    )
    floor_cpu = timings["floor"].as_dict()["cpu_median_s"]
    same_as_hooks = sum(hook_texts.get((r.site, r.layer, float(r.alpha))) == r.output for r in shared_df.itertuples())
    return {
        "cells": len(shared_df),
        "timings": {k: v.as_dict() for k, v in timings.items()},
        "shape": f"1 token x {len(scope.sites)} sites x {len(scope.layers)} layers x {len(scope.alphas)} alphas, "
        f"{sizes.max_new_tokens} new tokens",
        "ratios": {
            "unshared/shared": paired_ratio(timings["unshared"], timings["shared"]),
            "hooks/shared": paired_ratio(timings["hooks"], timings["shared"]),
            "shared/hooks_shared": paired_ratio(timings["shared"], timings["hooks_shared"]),
            "shared/floor": paired_ratio(timings["shared"], timings["floor"]),
            "hooks_shared/floor": paired_ratio(timings["hooks_shared"], timings["floor"]),
            "shared/shared_2threads": paired_ratio(timings["shared"], timings["shared_2threads"]),
        },
        "floor": {
            "gflop": flops / 1e9,
            "gemm_shape": shape,
            "cpu_median_s": floor_cpu,
            "gemm_gflops_1thread": flops / 1e9 / floor_cpu,
        },
        "agreement": {
            "shared_vs_unshared_text": [int((shared_df["output"] == unshared_df["output"]).sum()), len(shared_df)],
            "shared_vs_unshared_ids": [
                sum(a == b for a, b in zip(shared_df["output_ids"], unshared_df["output_ids"])),
                len(shared_df),
            ],
            "shared_vs_hooks_text": [same_as_hooks, len(shared_df)],
            "shared_vs_hooks_shared_text": [same_as_hooks_shared, len(hooks_shared_texts)],
        },
    }


def _pair(model, name: str, scope, rounds: int) -> dict:
    """shared vs unshared on one grid; their outputs must agree."""
    import superscopes

    unshared = W.replace(scope, share_prefix=False)
    items = [
        Item("shared", lambda r: superscopes.run(model, scope, progress=False)),
        Item("unshared", lambda r: superscopes.run(model, unshared, progress=False)),
    ]
    log(f"{name}: {rounds} rounds")
    timings = interleave(items, rounds, warmup=1, log=log)
    a, b = superscopes.run(model, scope, progress=False), superscopes.run(model, unshared, progress=False)
    same = sum(x == y for x, y in zip(a["output_ids"], b["output_ids"]))
    return {
        "cells": len(a),
        "timings": {k: v.as_dict() for k, v in timings.items()},
        "ratios": {"unshared/shared": paired_ratio(timings["unshared"], timings["shared"])},
        "agreement_ids": [same, len(a)],
    }


def block_pairs(model, sizes: W.Sizes, rounds: int, quick: bool) -> dict:
    import superscopes

    n = superscopes.sites.num_layers(model)
    grids = {
        # Patchscopes token identity: the identity prompt, every layer, next-token top-10.
        "token identity sweep (all layers, top-k)": superscopes.Scope(
            W.SOURCE,
            token=W.TOKEN,
            sites=["resid_post"],
            layers=list(range(2 if quick else n)),
            alphas=[1],
            target="identity",
            target_layers=["same"],
            output="topk",
        ),
        "512 cells (top-k, short target)": W.cells_scope(8 if quick else 512),
        # Back-patching: later layers written into earlier ones of the source prompt itself.
        "back-patching (source prompt, generate)": superscopes.Scope(
            W.SOURCE,
            sites=["resid_post"],
            layers=[8, 12, 16, 20] if not quick else [8],
            alphas=[1, 3],
            target="source",
            target_layers=[0, 2, 4, 6] if not quick else [0],
            max_new_tokens=sizes.max_new_tokens,
        ),
    }
    return {name: _pair(model, name, scope, rounds) for name, scope in grids.items()}


def block_length(model, rounds: int, quick: bool) -> dict:
    """Cost vs target length: 64 top-k cells patched at the last token of targets of 8 to 512
    tokens (prose), shared vs unshared. Shared should be nearly flat in length."""
    import superscopes

    points = {}
    for n_tokens in [8, 32] if quick else [8, 32, 128, 512]:
        target = W.text_of_length(model.tokenizer, n_tokens - 1) + " x"
        scope = superscopes.Scope(
            W.SOURCE,
            token=W.TOKEN,
            sites=["resid_post"],
            layers=list(range(8)),
            alphas=W.CELL_ALPHAS,
            target=target,
            target_position="last",
            target_layers=["same"],
            output="topk",
        )
        points[n_tokens] = _pair(model, f"length {n_tokens}", scope, rounds)
    return points


def cold_start() -> dict:
    """Seconds for `import superscopes`, then the first cached load of the embedded model, in a new
    process, split into what the toolkit can change and what it cannot: the imports of torch,
    transformers and nnsight it needs, its own modules, and the first load (mostly transformers'
    lazy imports of the model and tokenizer classes) against a second load of the same model."""
    code = (
        "import time; t0 = time.perf_counter(); import torch, transformers, nnsight; t1 = time.perf_counter(); "
        "import superscopes; t2 = time.perf_counter(); superscopes.load('smollm2-135m'); t3 = time.perf_counter(); "
        "superscopes.load('smollm2-135m'); t4 = time.perf_counter(); print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)"
    )
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
        runs.append([float(x) for x in out.stdout.split()])
    keys = ["third_party_import_s", "own_import_s", "first_load_s", "second_load_s"]
    result = {key: [r[i] for r in runs] for i, key in enumerate(keys)}
    result["import_s"] = [r[0] + r[1] for r in runs]
    return result


PEAK_CODE = """
import json, sys, torch
from pathlib import Path
import superscopes
from benchmarks import workloads as W

torch.set_num_threads(1)
model = superscopes.load(sys.argv[1])
weights = sum(p.numel() * p.element_size() for p in model._module.parameters())
status = Path("/proc/self/status")
def rss(field):
    line = next(l for l in status.read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
loaded = rss("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak from here on is the grid's
with torch.inference_mode():
    superscopes.run(model, W.grid_scope(W.QUICK if sys.argv[2] == "quick" else W.FULL), progress=False)
print(json.dumps({"weights_bytes": weights, "rss_after_load_bytes": loaded, "peak_rss_bytes": rss("VmHWM")}))
"""


def peak_memory(model_name: str, quick: bool) -> dict:
    """Peak resident memory of one ``shared`` paper-grid run in a new process, after the load
    (Linux resets the peak through /proc/self/clear_refs), against the bytes of the weights."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_CODE, model_name, "quick" if quick else "full"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    found["peak/weights"] = found["peak_rss_bytes"] / found["weights_bytes"]
    return found


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# The graph: shared prefix vs whole prompt per row",
        "",
        f"`{meta['command']}` on {meta['date_utc']}, {meta['cpu_model']}, {meta['cpu_cores']} cores, "
        f"load average {meta['loadavg_start']} at start and {meta['loadavg_end']} at the end; {meta['model']} "
        "float32, 1 torch thread unless named. Times: median (min-max) over interleaved rounds.",
        "",
    ]

    def t(d):
        return f"{d['median_s']:.2f} ({d['min_s']:.2f}-{d['max_s']:.2f})"

    def c(d):
        return f"{d['cpu_median_s']:.2f} ({d['cpu_min_s']:.2f}-{d['cpu_max_s']:.2f})"

    def r(d):
        return f"{d['median']:.2f}x wall ({d['min']:.2f}-{d['max']:.2f}); {d['cpu']['median']:.2f}x CPU"

    g = results["paper_grid"]
    lines += [
        f"## The paper's grid: {g['cells']} cells ({g['shape']}, l* = l, greedy)",
        "",
        "| contender | wall s | CPU s |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {t(d)} | {c(d)} |" for name, d in g["timings"].items()]
    fl, agree = g["floor"], g["agreement"]
    lines += [
        "",
        *[f"- {name}: {r(d)}" for name, d in g["ratios"].items()],
        f"- compute floor: {fl['gflop']:.0f} GFLOP of {fl['gemm_shape']} one-thread GEMMs, "
        f"{fl['cpu_median_s']:.2f} s of CPU ({fl['gemm_gflops_1thread']:.0f} GFLOP/s), in the same rounds",
        f"- agreement: shared vs unshared texts {agree['shared_vs_unshared_text']}, ids "
        f"{agree['shared_vs_unshared_ids']}; shared vs the authors' hooks texts {agree['shared_vs_hooks_text']}; "
        f"shared vs hand-written hooks with the shared prefix texts {agree['shared_vs_hooks_shared_text']} "
        "(resid_post cells)",
        "",
    ]
    if "peak_memory" in results:
        m = results["peak_memory"]
        lines += [
            f"- peak memory of a `shared` run in a new process: {m['peak_rss_bytes'] / 2**30:.2f} GiB resident "
            f"vs {m['weights_bytes'] / 2**30:.2f} GiB of weights ({m['peak/weights']:.2f}x; "
            f"{m['rss_after_load_bytes'] / 2**30:.2f} GiB after the load)",
            "",
        ]
    if "pairs" not in results:
        return "\n".join(lines) + "\n"
    lines += [
        "## Other grids",
        "",
        "| grid | cells | shared wall s | shared CPU s | unshared wall s | unshared CPU s | "
        "unshared / shared | same ids |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = list(results["pairs"].items()) + [
        (f"length {k} tokens (top-k, 64 cells)", v) for k, v in results["length"].items()
    ]
    for name, d in rows:
        s, u = d["timings"]["shared"], d["timings"]["unshared"]
        lines.append(
            f"| {name} | {d['cells']} | {t(s)} | {c(s)} | {t(u)} | {c(u)} | {r(d['ratios']['unshared/shared'])} "
            f"| {d['agreement_ids'][0]}/{d['agreement_ids'][1]} |"
        )
    cs = results["cold_start"]

    def secs(key):
        return ", ".join(f"{x:.2f}" for x in cs[key])

    totals = [a + b for a, b in zip(cs["import_s"], cs["first_load_s"])]
    lines += [
        "",
        "## Cold start (new process, 3 runs)",
        "",
        f"- `import superscopes`: {secs('import_s')} s, of which torch, transformers and nnsight "
        f"{secs('third_party_import_s')} s and superscopes' own modules {secs('own_import_s')} s",
        f"- then the first cached `superscopes.load('smollm2-135m')`: {secs('first_load_s')} s; a second load "
        f"in the same process (the same work without transformers' first-use imports): {secs('second_load_s')} s",
        f"- together: {', '.join(f'{x:.2f}' for x in totals)} s",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.graph", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small grids, 2 rounds")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="embedded name, HF repo id or local directory; "
        "another than the default runs the paper grid and peak memory only",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    meta = machine_info(1, REPO)
    meta.update(
        command="python -m benchmarks.graph " + " ".join(argv if argv is not None else sys.argv[1:]),
        loadavg_start=loadavg(),
        quick=args.quick,
        model=args.model,
    )
    import superscopes

    everything = args.model == DEFAULT_MODEL
    results: dict = {"meta": meta}
    if not everything:  # first, in a new process, so that two copies of the weights never coexist
        results["peak_memory"] = peak_memory(args.model, args.quick)
    model = superscopes.load(args.model)
    sizes = W.QUICK if args.quick else W.FULL
    rounds = 2 if args.quick else 3
    with torch.inference_mode():
        results["paper_grid"] = block_paper_grid(model, sizes, rounds)
        if everything:
            results["pairs"] = block_pairs(model, sizes, rounds, args.quick)
            results["length"] = block_length(model, rounds, args.quick)
    if everything:
        results["cold_start"] = cold_start()
    meta["loadavg_end"] = loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if everything else f"-{Path(args.model).name}") + ("-quick" if args.quick else "")
    (args.out / f"graph{suffix}.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / f"graph{suffix}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
