"""Remote sweeps against an NDIF server: requests, bytes and wall time per sweep.

Compares, on the same token-identity readout (every layer of SmolLM2, one source token):
  ours       - superscopes.run(..., output="topk", remote=True): one session, top-k back;
  per-layer  - one remote trace per layer returning the full next-token distribution
               (what nnterp's patchscope_lens does), each a request;
  local      - the same grid as `ours`, run locally.
Needs a server (`make ndif-up`). Run: python -m benchmarks.remote_sweep [--repeats N]
Writes benchmarks/results/remote_sweep.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from nnsight.intervention.backends import remote as remote_backend

import superscopes
from superscopes import Scope
from superscopes.prompts import IDENTITY

SOURCE = "Diana, Princess of Wales"
RESULTS = Path(__file__).parent / "results"


class Meter:
    """Counts requests and bytes the nnsight client sends and receives (client side)."""

    def __init__(self) -> None:
        self.requests = self.sent = self.received = 0
        backend = remote_backend.RemoteBackend
        serialize, parse = backend._serialize, backend.parse

        def counted_serialize(this, tracer):
            blob = serialize(this, tracer)
            self.requests += 1
            self.sent += len(blob)
            return blob

        def counted_parse(message):
            self.received += len(message)
            return parse(message)

        backend._serialize = counted_serialize
        backend.parse = staticmethod(counted_parse)

    def snapshot(self) -> tuple[int, int, int]:
        return self.requests, self.sent, self.received


def ours(model, layers: list[int], remote: bool):
    scope = Scope(
        SOURCE,
        sites=["resid_post"],
        layers=layers,
        alphas=[1],
        target="identity",
        target_layers=["same"],
        output="topk",
        top_k=10,
    )
    return superscopes.run(model, scope, remote=remote, progress=False)


def per_layer_full_vocab(model, layers: list[int]):
    """One remote trace per layer; each returns the full next-token distribution."""
    out = []
    for layer in layers:
        with model.trace(remote=True) as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(SOURCE):
                h = model.model.layers[layer].output[:, -1].clone()
                barrier()
            with tracer.invoke(IDENTITY):
                barrier()
                model.model.layers[layer].output[:, -1] = h
                probs = model.lm_head.output[:, -1].softmax(-1).save()
        out.append(probs)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from nnsight import CONFIG

    os.environ.setdefault("NDIF_HOST", "http://127.0.0.1:5001")
    CONFIG.APP.REMOTE_LOGGING = False  # no status spinner in the table output
    remote_model = superscopes.load("smollm2-135m", remote=True)
    local_model = superscopes.load("smollm2-135m")
    layers = list(range(remote_model.config.num_hidden_layers))
    meter = Meter()
    variants = {
        "ours (one session, top-10)": lambda: ours(remote_model, layers, True),
        "per-layer traces, full vocabulary": lambda: per_layer_full_vocab(remote_model, layers),
        "ours, local": lambda: ours(local_model, layers, False),
    }
    with torch.inference_mode():
        for run in variants.values():  # warm-up
            run()
        rows = {name: {"seconds": [], "requests": 0, "sent": 0, "received": 0} for name in variants}
        for _ in range(args.repeats):  # interleaved: A B C A B C ...
            for name, run in variants.items():
                before = meter.snapshot()
                start = time.perf_counter()
                run()
                rows[name]["seconds"].append(time.perf_counter() - start)
                after = meter.snapshot()
                rows[name]["requests"], rows[name]["sent"], rows[name]["received"] = (
                    after[0] - before[0],
                    after[1] - before[1],
                    after[2] - before[2],
                )

    ours_name = next(iter(variants))
    lines = [
        f"Remote sweep: token identity of {SOURCE!r}, all {len(layers)} layers of smollm2-135m, "
        f"local NDIF server (ndif 0.1.2, CPU) on 127.0.0.1; {args.repeats} interleaved repeats after warm-up; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}.",
        "",
        "| variant | requests / sweep | sent / sweep | received / sweep | median wall s (min-max) | wall vs ours |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    reference = statistics.median(rows[ours_name]["seconds"])
    for name, row in rows.items():
        seconds = row["seconds"]
        lines.append(
            f"| {name} | {row['requests']} | {row['sent'] / 1e3:.1f} kB | {row['received'] / 1e3:.1f} kB | "
            f"{statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f}) | "
            f"{statistics.median(seconds) / reference:.2f}x |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "remote_sweep.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "remote_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
