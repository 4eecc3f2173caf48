"""Lab helper: how long every thread on the machine waited for a CPU (Linux /proc/*/task/*/schedstat), to tell CPU
oversubscription (runnable threads queueing for cores) from waits of other kinds (the GIL, a lock, a pipe).

    before = snapshot(); ...; report = delta(before, snapshot(), groups)

schedstat holds per thread: time on a CPU (ns), time runnable but waiting on a run queue (ns), time slices run.
"""
from __future__ import annotations

import os
from pathlib import Path


def snapshot() -> dict[tuple[int, int], tuple[int, int, int, str]]:
    """(pid, tid) -> (cpu ns, run-queue wait ns, slices, thread name) for every thread readable now."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            tasks = list((proc / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                cpu, wait, slices = (int(x) for x in (task / "schedstat").read_text().split())
                name = (task / "comm").read_text().strip()
            except (OSError, ValueError):
                continue
            out[(int(proc.name), int(task.name))] = (cpu, wait, slices, name)
    return out


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def delta(before: dict, after: dict, groups: dict[str, set[int]], seconds: float) -> dict:
    """Per group of pids (and "other"): CPU seconds used, run-queue wait seconds, the thread that waited longest
    (name, ms, slices) and the wait per slice in the group (ms)."""
    report: dict[str, dict] = {}
    for key, (cpu, wait, slices, name) in after.items():
        old = before.get(key, (0, 0, 0, name))
        d_cpu, d_wait, d_slices = cpu - old[0], wait - old[1], slices - old[2]
        if d_slices <= 0:
            continue
        group = next((g for g, pids in groups.items() if key[0] in pids), "other")
        r = report.setdefault(group, {"threads": 0, "cpu_s": 0.0, "runq_wait_s": 0.0, "slices": 0,
                                      "worst": ("", 0.0, 0), "busiest": []})
        r["busiest"].append((f"{key[0]}/{key[1]} {name}", round(d_cpu / 1e9 / seconds, 3), round(d_wait / 1e6, 2),
                             d_slices))
        r["threads"] += 1
        r["cpu_s"] += d_cpu / 1e9
        r["runq_wait_s"] += d_wait / 1e9
        r["slices"] += d_slices
        if d_wait / 1e6 > r["worst"][1]:
            r["worst"] = (f"{key[0]}/{key[1]} {name}", d_wait / 1e6, d_slices)
    for r in report.values():
        r["busiest"] = sorted(r["busiest"], key=lambda t: -t[1])[:6]  # (thread, cores, run-queue wait ms, slices)
        r["wait_per_slice_ms"] = r["runq_wait_s"] * 1e3 / max(r["slices"], 1)
        r["cpu_cores"] = r["cpu_s"] / seconds
    return report


def descendants(pid: int) -> set[int]:
    """pid and every process below it."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def cpus() -> int:
    return len(os.sched_getaffinity(0))
