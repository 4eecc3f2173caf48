"""Turns raw samples into the committed results: summary.json, CSV tables and PNG plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from bench.common import summary


def _ttft_table(systems: dict, floors: dict) -> dict:
    out = {}
    for name, record in systems.items():
        if "error" in record:
            out[name] = {"error": record["error"]}
            continue
        entry = {"setup_s": record.get("setup_s"), "ttft": {}}
        for length, samples in record["ttft"].items():
            s = summary(samples)
            floor = floors["prefill_floor_ms"].get(int(length)) if floors else None
            if floor:
                s["floor_ms"] = floor
                s["ratio_to_floor"] = s["median_ms"] / floor
            entry["ttft"][int(length)] = s
        if record.get("decode"):
            d = summary(record["decode"])
            if floors:
                d["floor_ms"] = floors["decode_floor_ms"]
                d["ratio_to_floor"] = d["median_ms"] / floors["decode_floor_ms"]
            entry["decode"] = d
            entry["decode_curve_ms"] = _curve(record["decode"])
        if record.get("decode_at_context"):
            entry["decode_at_context"] = {int(n): summary(v) for n, v in record["decode_at_context"].items()}
        for key in ("warm", "capture_s", "graph_bytes"):
            if key in record:
                entry[key] = record[key]
        out[name] = entry
    return out


def _curve(intervals: list[float], tokens: int = 397) -> list[float]:
    """Median interval per token index over the runs (context = 10 + index + 1)."""
    runs = max(1, len(intervals) // tokens)
    if len(intervals) < tokens:
        return [x * 1e3 for x in intervals]
    per_index = [sorted(intervals[r * tokens + i] for r in range(runs)) for i in range(tokens)]
    return [v[len(v) // 2] * 1e3 for v in per_index]


def _int_keys(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}


def build_summary(raw: dict) -> dict:
    s = {"environment": raw["environment"], "quick": raw.get("quick", False)}
    f = raw.get("floors", {})
    s["floors"] = {"copy_TBps": f.get("copy_bytes_per_s", 0) / 1e12, "matmul_TFLOPs": f.get("matmul_flops_per_s", 0) / 1e12}
    for model in ("llama2_7b", "smollm2_135m"):
        if model not in raw:
            continue
        m = raw[model]
        floors = m.get("floors")
        if floors:
            floors = dict(floors, prefill_floor_ms=_int_keys(floors["prefill_floor_ms"]))
        entry = {"floors": floors, "systems": _ttft_table(m.get("systems", {}), floors)}
        if "bucket_sets" in m:
            entry["bucket_sets"] = m["bucket_sets"]
        if "rolling_cache" in m:
            rc = m["rolling_cache"]
            tl = rc["timeline"]
            entry["rolling_cache"] = {
                "requests": len(tl), "requests_without_capture": sum(t["hit"] for t in tl),
                "captures": rc["final"]["captures"], "evictions": rc["final"]["evictions"],
                "max_bytes": max(t["bytes"] for t in tl), "budget_bytes": rc["budget_bytes"],
                "ttft_hit_median_ms": summary([t["ttft_ms"] / 1e3 for t in tl if t["hit"]]).get("median_ms"),
                "ttft_miss_median_ms": summary([t["ttft_ms"] / 1e3 for t in tl if not t["hit"]]).get("median_ms"),
                "timeline": tl}
        s[model] = entry
    if "grpc" in raw:
        g = raw["grpc"]
        if "error" in g:
            s["grpc"] = g
        else:
            inproc = s.get("llama2_7b", {}).get("systems", {}).get("hjcg-hybrid", {})
            s["grpc"] = {"model": g["model"], "server_start_s": g.get("server_start_s")}
            for label in ("tcp", "unix"):
                if label not in g:
                    continue
                ttft = {int(n): summary(v) for n, v in g[label]["ttft"].items()}
                dec = summary(g[label]["decode"])
                for n, t in ttft.items():
                    base = inproc.get("ttft", {}).get(n)
                    if base:
                        t["overhead_ms"] = t["median_ms"] - base["median_ms"]
                if inproc.get("decode"):
                    dec["overhead_ms"] = dec["median_ms"] - inproc["decode"]["median_ms"]
                s["grpc"][label] = {"ttft": ttft, "decode": dec}
    return s


def write_tables(s: dict, out: Path) -> None:
    with open(out / "ttft.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "system", "prompt_tokens", "median_ms", "p99_ms", "floor_ms", "ratio_to_floor"])
        for model in ("llama2_7b", "smollm2_135m"):
            for name, e in s.get(model, {}).get("systems", {}).items():
                for n, t in e.get("ttft", {}).items():
                    w.writerow([model, name, n, f"{t['median_ms']:.3f}", f"{t['p99_ms']:.3f}",
                                f"{t.get('floor_ms', 0):.3f}", f"{t.get('ratio_to_floor', 0):.3f}"])
    with open(out / "decode.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "system", "context", "median_ms", "mean_ms", "p99_ms", "floor_ms", "ratio_to_floor"])
        for model in ("llama2_7b", "smollm2_135m"):
            for name, e in s.get(model, {}).get("systems", {}).items():
                if "decode" in e:
                    d = e["decode"]
                    w.writerow([model, name, "10-407", f"{d['median_ms']:.3f}", f"{d['mean_ms']:.3f}",
                                f"{d['p99_ms']:.3f}", f"{d.get('floor_ms', 0):.3f}", f"{d.get('ratio_to_floor', 0):.3f}"])
                for n, d in e.get("decode_at_context", {}).items():
                    w.writerow([model, name, n, f"{d['median_ms']:.3f}", f"{d['mean_ms']:.3f}", f"{d['p99_ms']:.3f}", "", ""])


def _ttft_medians(entry: dict) -> tuple[list[int], list[float]]:
    xs = sorted(entry["ttft"])
    return xs, [entry["ttft"][x]["median_ms"] for x in xs]


def _save(fig, ax, path: Path, legend_size: int = 8, grid: bool = False) -> None:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=legend_size)
    if grid:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = s.get("llama2_7b")
    if not m:
        return
    device = s["environment"].get("device", "?")
    commit = s["environment"].get("commit", "?")[:10]
    systems = {k: v for k, v in m["systems"].items() if "ttft" in v}

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, e in systems.items():
        ax.plot(*_ttft_medians(e), marker="o", label=name)
    floors = _int_keys(m["floors"]["prefill_floor_ms"])
    xs = sorted(floors)
    ax.plot(xs, [floors[x] for x in xs], "k--", label="floor")
    ax.set(xlabel="prompt tokens", ylabel="TTFT median (ms)", yscale="log",
           title=f"Llama-2-7B shape, fp16 — TTFT ({device}, {commit})")
    _save(fig, ax, out / "ttft.png", grid=True)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, e in systems.items():
        curve = e.get("decode_curve_ms")
        if curve:
            ax.plot(range(11, 11 + len(curve)), curve, label=name, linewidth=1)
    paper = systems.get("seed-paper")
    if paper:
        ax.plot(*_ttft_medians(paper), marker="o", label="seed-paper (full forward)")
    ax.axhline(m["floors"]["decode_floor_ms"], color="k", linestyle="--", label="floor")
    ax.set(xlabel="context tokens", ylabel="ms per token", yscale="log",
           title=f"Decode latency against context ({device}, {commit})")
    _save(fig, ax, out / "decode.png", grid=True)

    fig, ax = plt.subplots(figsize=(6, 6))
    for name, e in systems.items():
        pts = [(t["median_ms"], t["p99_ms"]) for t in e["ttft"].values()]
        if "decode" in e:
            pts.append((e["decode"]["median_ms"], e["decode"]["p99_ms"]))
        ax.scatter(*zip(*pts), label=name, s=14)
    lim = [0.5, max(p for e in systems.values() for t in e["ttft"].values() for p in [t["p99_ms"]]) * 1.2]
    ax.plot(lim, lim, "k:", label="p99 = median")
    ax.plot(lim, [1.05 * x for x in lim], "k--", linewidth=0.8, label="p99 = 1.05 median")
    ax.set(xscale="log", yscale="log", xlabel="median (ms)", ylabel="p99 (ms)", title="Tail latency (TTFT, decode)")
    _save(fig, ax, out / "p99_vs_median.png", legend_size=7)

    rc = m.get("rolling_cache")
    if rc:
        tl = rc["timeline"]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot([t["request"] for t in tl], [t["bytes"] / 2**20 for t in tl], label="graph cache bytes (MiB)")
        ax.axhline(rc["budget_bytes"] / 2**20, color="r", linestyle="--", label="budget")
        misses = [t for t in tl if not t["hit"]]
        ax.scatter([t["request"] for t in misses], [t["bytes"] / 2**20 for t in misses], s=10, color="orange",
                   label="capture")
        ax.set(xlabel="request", ylabel="MiB", title=f"Rolling graph cache, random prompt lengths 1-2048 ({device})")
        _save(fig, ax, out / "cache_memory.png")


def write_all(raw: dict, out: Path) -> dict:
    s = build_summary(raw)
    (out / "summary.json").write_text(json.dumps(s, indent=1, default=str))
    write_tables(s, out)
    plot(s, out)
    return s
