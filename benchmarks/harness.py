"""Timing harness: interleaved rounds, medians with min-max, paired ratios, machine facts."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Item:
    """One contender in an interleaved block.

    ``fn(round)`` does the work of one round and may return a dict of facts (kept from
    the last round). ``scale`` turns a round's time into the quantity reported: a
    contender that runs 1/3 of the grid per round has ``scale=3`` (the per-round
    estimate of the whole grid). ``warm`` runs before the rounds (default: ``fn(0)``)."""

    name: str
    fn: Callable[[int], Any]
    scale: float = 1.0
    warm: Callable[[], Any] | None = None
    note: str = ""


@dataclass
class Timing:
    name: str
    times: list[float] = field(default_factory=list)  # seconds per round, already scaled
    raw: list[float] = field(default_factory=list)  # seconds per round as measured
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per round, scaled like times
    scale: float = 1.0
    note: str = ""
    facts: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def lo(self) -> float:
        return min(self.times)

    @property
    def hi(self) -> float:
        return max(self.times)

    def as_dict(self) -> dict:
        return {
            "median_s": self.median,
            "min_s": self.lo,
            "max_s": self.hi,
            "cpu_median_s": statistics.median(self.cpu),
            "cpu_min_s": min(self.cpu),
            "cpu_max_s": max(self.cpu),
            "rounds": len(self.times),
            "times_s": self.times,
            "cpu_times_s": self.cpu,
            "raw_times_s": self.raw,
            "scale": self.scale,
            "note": self.note,
        }


def interleave(
    items: list[Item], rounds: int, warmup: int = 1, log: Callable[[str], None] = print
) -> dict[str, Timing]:
    """Run ``items`` in interleaved rounds (A B C, then C B A, ...) after ``warmup`` passes.

    Each measurement records wall-clock time and this process's CPU time. The order is
    reversed on alternate rounds so that a slow drift of the machine (other processes
    starting or ending) affects every contender alike. ``gc.collect()`` runs before each
    measurement, outside the timed region."""
    for _ in range(warmup):
        for item in items:
            (item.warm or (lambda item=item: item.fn(0)))()
    result = {item.name: Timing(item.name, scale=item.scale, note=item.note) for item in items}
    for r in range(rounds):
        order = items if r % 2 == 0 else items[::-1]
        for item in order:
            gc.collect()
            cpu_start = time.process_time()
            start = time.perf_counter()
            facts = item.fn(r)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            timing = result[item.name]
            timing.raw.append(elapsed)
            timing.times.append(elapsed * item.scale)
            timing.cpu.append(cpu * item.scale)
            if facts is not None:
                timing.facts = facts
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{i.name} {result[i.name].times[-1]:.3f}s" for i in items))
    return result


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_round": values}


def paired_ratio(a: Timing, b: Timing) -> dict:
    """a/b per round (the two ran back to back), summarised: median and min-max; wall-clock
    time, and under ``cpu`` the same for process CPU time (less sensitive to other processes)."""
    out = _summary([x / y for x, y in zip(a.times, b.times)])
    out["cpu"] = _summary([x / y for x, y in zip(a.cpu, b.cpu)])
    return out


def paired_difference(a: Timing, b: Timing) -> dict:
    """a - b per round in seconds, summarised (wall-clock; ``cpu``: process CPU time)."""
    out = _summary([x - y for x, y in zip(a.times, b.times)])
    out["cpu"] = _summary([x - y for x, y in zip(a.cpu, b.cpu)])
    return out


# ---------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_commit(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True)
        if head.returncode != 0:
            return "unknown"
        return head.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def machine_info(threads: int, repo: Path) -> dict:
    import nnsight
    import torch
    import transformers

    try:
        total_kb = int(
            next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1]
        )
        memory_gb = round(total_kb / 1024**2, 1)
    except (OSError, StopIteration):
        memory_gb = None
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "torch_threads": threads,
        "torch": torch.__version__,
        "nnsight": getattr(nnsight, "__version__", "?"),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(repo),
    }


# ---------------------------------------------------------------- memory (Linux /proc)


def proc_status_kb(key: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in KiB, from /proc/self/status."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
