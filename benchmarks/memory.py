"""Peak memory per configuration, measured in a separate process.

``python -m benchmarks.memory --threads N`` reads a JSON list of configurations on stdin and
writes a JSON list of results on stdout. It loads the model once, runs a one-cell warm-up,
then forks one child per configuration. Each child runs the warm-up again (so the model's
weights and the libraries' code are resident and counted in its starting RSS), resets its
peak RSS (``/proc/self/clear_refs``, Linux >= 4.0), runs the configuration once and
reports ``peak RSS - RSS before the run``: the extra resident memory the configuration
needed, torch's CPU allocations and allocator caching included. ``tracemalloc`` would miss
torch's allocations; ``ru_maxrss`` alone cannot be reset, so a child starting below the
model-loading peak would read zero.

Where ``clear_refs`` cannot be written the child samples its RSS every millisecond from
``/proc/self/statm`` in a thread instead (``method`` says which).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time


def _rss_kb_fast() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_kb_fast()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss_kb_fast())
            time.sleep(0.001)


def _workload(model, config: dict):
    import superscopes
    from benchmarks import workloads as W

    kind = config["kind"]
    if kind == "cells":
        scope = W.cells_scope(config["cells"], batch_size=config.get("batch_size", 64))
        return lambda: superscopes.run(model, scope, progress=False), {"cells": config["cells"]}
    if kind == "length":
        text = W.text_of_length(model.tokenizer, config["tokens"])
        scope = W.length_scope(text, config["alphas"])
        n = len(model.tokenizer(text)["input_ids"])
        return lambda: superscopes.run(model, scope, progress=False), {"tokens_actual": n}
    raise ValueError(f"unknown memory configuration {config!r}")


def _child(model, config: dict, warm, write_fd: int) -> None:
    from benchmarks.harness import proc_status_kb, reset_peak_rss

    try:
        run, facts = _workload(model, config)
        warm()
        gc.collect()
        sampler = None
        method = "VmHWM after clear_refs reset"
        if not reset_peak_rss():
            method = "RSS sampled every 1 ms"
            sampler = _Sampler()
            sampler.start()
        before = proc_status_kb("VmRSS")
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        if sampler is not None:
            sampler.running = False
            sampler.join()
            peak = max(sampler.peak, _rss_kb_fast())
        else:
            peak = proc_status_kb("VmHWM")
        result = {
            **config,
            **facts,
            "method": method,
            "rss_before_mb": before / 1024,
            "peak_rss_mb": peak / 1024,
            "peak_delta_mb": (peak - before) / 1024,
            "seconds": seconds,
        }
    except Exception as error:  # reported, not raised: the parent keeps going
        result = {**config, "error": f"{type(error).__name__}: {error}"}
    os.write(write_fd, json.dumps(result).encode())
    os.close(write_fd)


def measure(configs: list[dict], threads: int) -> list[dict]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)
    from nnsight.tracing.tracer import Tracer

    import superscopes
    import superscopes.graph
    import superscopes.scope
    from benchmarks import workloads as W

    for module in (superscopes.scope, superscopes.graph):  # pin the loaded code's text (see run.pin_trace_sources)
        Tracer.source(module.__file__)
    model = superscopes.load("smollm2-135m")
    warm_scope = W.cells_scope(1)

    def warm():
        superscopes.run(model, warm_scope, progress=False)

    results = []
    with torch.inference_mode():
        warm()
        for config in configs:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                os.close(read_fd)
                code = 0
                try:
                    with torch.inference_mode():
                        _child(model, config, warm, write_fd)
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            os.close(write_fd)
            chunks = []
            while chunk := os.read(read_fd, 65536):
                chunks.append(chunk)
            os.close(read_fd)
            os.waitpid(pid, 0)
            result = json.loads(b"".join(chunks) or b'{"error": "child died"}')
            result.setdefault("kind", config["kind"])
            print(f"  memory {json.dumps(config)}: {result.get('peak_delta_mb', result.get('error'))}", file=sys.stderr)
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configs = json.loads(sys.stdin.read())
    print(json.dumps(measure(configs, args.threads)))


if __name__ == "__main__":
    main()
