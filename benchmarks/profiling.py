"""Where the grid's time goes: an exclusive-time breakdown by category, and a cProfile listing.

The breakdown wraps a handful of entry points for the duration of one run and keeps a
stack, so each category's time is *exclusive* (time in a nested category is counted there)
and the categories add up to the wall time of ``superscopes.run``:

- tokenisation: ``tokenizer(...)`` calls (planning, column lookup, nnsight's input batching)
- model forward: the HF model's own forward (torch forward hooks on the top module)
- nnsight interleaving: ``Interleaver.handle`` inside the forward: serving reads/writes and
  running the intervention code (our amplify-and-patch ops)
- generation loop: ``generate`` outside the forwards (logits processing, caches, streamer)
- trace build/teardown: the rest of the functions that run the traces (``_execute_reads`` /
  ``_execute_patches``, or ``read_vectors`` / ``_patch_pass`` in older versions): nnsight
  capturing, compiling and batching the trace, building the interleaver, saving results
- decoding: ``tokenizer.decode`` of the generated ids (and ``_collect``, which decodes the readouts)
- planning: the rest of ``plan`` and of the pass planning (validation, cells, columns)
- result table: ``_frame`` (the DataFrame)
- other: the rest of ``run`` (bookkeeping)
"""

from __future__ import annotations

import contextlib
import cProfile
import functools
import io
import pstats
import time
from collections import defaultdict

CATEGORIES = [
    "tokenisation",
    "model forward",
    "nnsight interleaving",
    "generation loop",
    "trace build/teardown",
    "decoding",
    "planning",
    "result table",
    "other",
]


# Functions of superscopes.scope, spec, batching and graph whose exclusive time is attributed to a category.
SCOPE_ENTRY_POINTS = {
    "trace build/teardown": ["read_vectors", "_execute_reads", "_execute_patches", "_patch_pass"],
    "planning": ["plan", "_read_passes", "_patch_passes"],
    "decoding": ["_collect"],
    "result table": ["_frame"],
}


class CategoryTimer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[str] = []
        self.mark = 0.0

    def push(self, category: str) -> None:
        now = time.perf_counter()
        if self.stack:
            self.totals[self.stack[-1]] += now - self.mark
        self.stack.append(category)
        self.calls[category] += 1
        self.mark = now

    def pop(self) -> None:
        now = time.perf_counter()
        self.totals[self.stack.pop()] += now - self.mark
        self.mark = now

    def wrap(self, fn, category: str):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.push(category)
            try:
                return fn(*args, **kwargs)
            finally:
                self.pop()

        return wrapped


@contextlib.contextmanager
def _patched(obj, name: str, value):
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def breakdown(model, run) -> dict:
    """Run ``run()`` once with the category timer installed; returns seconds per category."""
    from nnsight.intervention.interleaver import Interleaver

    import superscopes.batching as batching_module
    import superscopes.graph as graph_module
    import superscopes.scope as scope_module
    import superscopes.spec as spec_module

    timer = CategoryTimer()
    hf = model._module
    tok_cls = type(model.tokenizer)
    tokenizer = model.tokenizer
    wraps = [
        (tok_cls, "__call__", timer.wrap(tok_cls.__call__, "tokenisation")),
        (Interleaver, "handle", timer.wrap(Interleaver.handle, "nnsight interleaving")),
        (type(hf), "generate", timer.wrap(type(hf).generate, "generation loop")),
    ]
    wrapped = []
    for category, names in SCOPE_ENTRY_POINTS.items():
        for name in names:  # the core evolves: wrap the entry points this version has, where it calls them
            for module in (scope_module, spec_module, batching_module, graph_module):
                fn = getattr(module, name, None)
                if callable(fn):
                    wraps.append((module, name, timer.wrap(fn, category)))
                    wrapped.append(f"{module.__name__}.{name} -> {category}")
    pre = hf.register_forward_pre_hook(lambda module, args: timer.push("model forward"))
    post = hf.register_forward_hook(lambda module, args, output: timer.pop())
    with contextlib.ExitStack() as stack:
        for obj, name, value in wraps:
            stack.enter_context(_patched(obj, name, value))
        stack.enter_context(_patched(tokenizer, "decode", timer.wrap(tokenizer.decode, "decoding")))
        stack.enter_context(_patched(tokenizer, "batch_decode", timer.wrap(tokenizer.batch_decode, "decoding")))
        try:
            start = time.perf_counter()
            timer.push("other")
            run()
            timer.pop()
            total = time.perf_counter() - start
        finally:
            pre.remove()
            post.remove()
    seconds = {c: timer.totals.get(c, 0.0) for c in CATEGORIES}
    return {
        "total_s": total,
        "seconds": seconds,
        "share": {c: s / total for c, s in seconds.items()},
        "calls": {c: timer.calls.get(c, 0) for c in CATEGORIES},
        "unbalanced_stack": len(timer.stack),
        "wrapped": wrapped,
    }


def cprofile(run, top: int = 25) -> dict:
    """cProfile one ``run()``: the top functions by own time and by cumulative time."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    try:
        run()
    finally:
        profiler.disable()
    total = time.perf_counter() - start
    rows = []
    stats = pstats.Stats(profiler)
    for (filename, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():
        rows.append({"function": _short(filename, line, name), "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    by_own = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    by_cum = sorted(rows, key=lambda r: -r["cumtime_s"])[:top]
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return {"total_s": total, "by_own_time": by_own, "by_cumulative_time": by_cum, "text": text.getvalue()}


def _short(filename: str, line: int, name: str) -> str:
    if filename == "~":
        return name
    for marker in ("site-packages/", "/work/main/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({name})"
