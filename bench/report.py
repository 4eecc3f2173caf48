"""Turns raw samples into the committed results: summary.json, CSV tables and PNG plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from bench.callers import percentile, stream_figures
from bench.common import summary
from bench.fp8_bench import fp8_summary


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
        for key in ("bucket_sets", "profile"):
            if key in m:
                entry[key] = m[key]
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
    if "fp8" in raw or "fp8_quality" in raw:
        s["fp8"] = fp8_summary(raw.get("fp8"), raw.get("fp8_quality"))
    if "structured" in raw:  # already in summary form (bench.structured_bench)
        s["structured"] = raw["structured"]
    for key, build in (("concurrency", concurrency_summary), ("grpc_overhead", grpc_overhead_summary),
                       ("open_loop", open_loop_summary)):
        if key in raw:
            s[key] = build(raw[key]) if "error" not in raw[key] else _error(raw[key])
    return s


def _error(section: dict) -> dict:
    return {k: section[k] for k in ("error", "model", "server", "server_log_tail") if k in section}


def _context(section: dict) -> dict:
    return {k: section[k] for k in ("model", "transport", "server") if k in section}


def concurrency_summary(c: dict) -> dict:
    """Per N: tokens/s (all tokens over the span from the first send to the last token, summed over the
    rounds), TTFT over the streams and inter-token intervals pooled over every stream."""
    streams = {}
    for n, level in sorted(c["levels"].items(), key=lambda kv: int(kv[0])):
        rounds = level["rounds"]
        pooled = stream_figures([x for r in rounds for x in r])
        per_round = [stream_figures(r) for r in rounds]
        span = sum(f["span_s"] for f in per_round)
        pooled["tokens_per_s"] = sum(f["tokens"] for f in per_round) / span if span else 0.0
        pooled["span_s"] = span
        pooled["peak_streams_in_flight"] = max(f["peak_streams_in_flight"] for f in per_round)
        pooled["rounds"] = len(rounds)
        streams[str(n)] = pooled
    return {**_context(c), "prompt_tokens": c.get("prompt_tokens"), "new_tokens": c.get("new_tokens"),
            "streams": streams}


def grpc_overhead_summary(g: dict) -> dict:
    out = {k: g[k] for k in ("model", "error") if k in g}
    inproc, grpc = g.get("inproc"), g.get("grpc")
    if inproc:
        t, d = summary(inproc["ttft10"]), summary(inproc["decode"])
        out.update(ttft10_inproc_ms=t["median_ms"], ttft10_inproc_p99_ms=t["p99_ms"],
                   itl_median_inproc_ms=d["median_ms"], itl_p99_inproc_ms=d["p99_ms"],
                   inproc_samples={"ttft": t["n"], "itl": d["n"]}, inproc_engine=inproc.get("engine"))
    if grpc:
        t, f = summary(grpc["ttft10"]), stream_figures(grpc["streams"])
        out.update(ttft10_grpc_ms=t["median_ms"], ttft10_grpc_p99_ms=t["p99_ms"],
                   itl_median_grpc_ms=f["itl_median_ms"], itl_p99_grpc_ms=f["itl_p99_ms"],
                   grpc_samples={"ttft": t["n"], "itl": f["itl_samples"], "streams": f["streams"]})
    if inproc and grpc:
        out["ttft10_overhead_ms"] = out["ttft10_grpc_ms"] - out["ttft10_inproc_ms"]
        out["itl_median_overhead_ms"] = out["itl_median_grpc_ms"] - out["itl_median_inproc_ms"]
    if "server" in g:
        out["server"] = g["server"]
    return out


def open_loop_summary(o: dict) -> dict:
    rates = {}
    for key, r in sorted(o["rates"].items(), key=lambda kv: float(kv[0])):
        f = stream_figures(r["streams"])
        lags = [x["send_ms"] - x["scheduled_ms"] for x in r["streams"]]
        sends = [x["send_ms"] for x in r["streams"]]
        rates[key] = {"rate": r["rate"], "requests": r["requests"], "completed": f["completed"], "errors": f["errors"],
                      "ttft_p50_ms": f["ttft_median_ms"], "ttft_p99_ms": f["ttft_p99_ms"],
                      "itl_p50_ms": f["itl_median_ms"], "itl_p99_ms": f["itl_p99_ms"],
                      "tokens_per_s": f["tokens_per_s"], "tokens": f["tokens"], "span_s": f["span_s"],
                      "offered_rps": (len(sends) - 1) / ((max(sends) - min(sends)) / 1e3) if len(sends) > 1 else 0.0,
                      "send_lag_p99_ms": percentile(lags, 99), "send_lag_max_ms": max(lags, default=0.0),
                      "peak_streams_in_flight": f["peak_streams_in_flight"],
                      "ttft_samples": f["ttft_samples"], "itl_samples": f["itl_samples"]}
    return {**_context(o), "prompt_range": o.get("prompt_range"), "new_range": o.get("new_range"),
            "seed": o.get("seed"), "tail_s": o.get("tail_s"), "rates": rates}


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


def write_caller_tables(s: dict, out: Path) -> None:
    f3 = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    c = s.get("concurrency", {}).get("streams")
    if c:
        with open(out / "concurrency.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["streams", "tokens_per_s", "itl_median_ms", "itl_p99_ms", "ttft_median_ms", "ttft_p99_ms",
                        "completed", "peak_streams_in_flight"])
            for n, e in c.items():
                w.writerow([n, f3(e["tokens_per_s"]), f3(e["itl_median_ms"]), f3(e["itl_p99_ms"]),
                            f3(e["ttft_median_ms"]), f3(e["ttft_p99_ms"]), e["completed"], e["peak_streams_in_flight"]])
    o = s.get("open_loop", {}).get("rates")
    if o:
        with open(out / "open_loop.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rate_per_s", "requests", "completed", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                        "tokens_per_s", "send_lag_max_ms"])
            for key, e in o.items():
                w.writerow([key, e["requests"], e["completed"], f3(e["ttft_p50_ms"]), f3(e["ttft_p99_ms"]),
                            f3(e["itl_p50_ms"]), f3(e["itl_p99_ms"]), f3(e["tokens_per_s"]), f3(e["send_lag_max_ms"])])


def _log_axes(ax, xs: list[float], xlabel: str) -> None:
    """Log-log axes with plain numbers: the x ticks at xs, no minor tick labels."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="ms")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_callers(s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    device = s["environment"].get("device", "?")
    commit = s["environment"].get("commit", "?")[:10]
    c = s.get("concurrency", {}).get("streams")
    if c:
        ns = [int(n) for n in c]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        left.plot(ns, [c[str(n)]["tokens_per_s"] for n in ns], marker="o", label="tokens/s, all streams")
        left.set(xscale="log", xlabel="concurrent streams", ylabel="tokens/s")
        left.set_xticks(ns, [str(n) for n in ns])
        left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for key, label, style in (("itl_median_ms", "inter-token median", "o-"),
                                  ("itl_p99_ms", "inter-token p99", "o--"),
                                  ("ttft_median_ms", "TTFT median", "s-"), ("ttft_p99_ms", "TTFT p99", "s--")):
            right.plot(ns, [c[str(n)][key] for n in ns], style, label=label)
        _log_axes(right, ns, "concurrent streams")
        fig.suptitle(f"{s['concurrency'].get('model', '')} through gRPC, N callers ({device}, {commit})")
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
        _save(fig, right, out / "concurrency.png", grid=True)
    o = s.get("open_loop", {}).get("rates")
    if o:
        rates = [float(k) for k in o]
        keys = list(o)
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        for key, label, style in (("ttft_p50_ms", "p50", "o-"), ("ttft_p99_ms", "p99", "o--")):
            left.plot(rates, [o[k][key] for k in keys], style, label=f"TTFT {label}")
        for key, label, style in (("itl_p50_ms", "p50", "o-"), ("itl_p99_ms", "p99", "o--")):
            right.plot(rates, [o[k][key] for k in keys], style, label=f"inter-token {label}")
        for ax in (left, right):
            _log_axes(ax, rates, "arrival rate (requests/s, Poisson)")
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
        lo, hi = s["open_loop"].get("prompt_range") or ("?", "?"), s["open_loop"].get("new_range") or ("?", "?")
        fig.suptitle(f"Open-loop load: prompts {lo[0]}-{lo[1]} tokens, {hi[0]}-{hi[1]} new ({device}, {commit})")
        _save(fig, right, out / "open_loop.png", grid=True)


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

    m = s.get("llama2_7b")
    if not m:
        return
    device = s["environment"].get("device", "?")
    commit = s["environment"].get("commit", "?")[:10]
    systems = {k: v for k, v in m["systems"].items() if "ttft" in v}
    if systems:
        _plot_systems(m, systems, device, commit, out)
    rc = m.get("rolling_cache")
    if rc:
        _plot_rolling_cache(rc, device, out)


def _plot_systems(m: dict, systems: dict, device: str, commit: str, out: Path) -> None:
    import matplotlib.pyplot as plt

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


def _plot_rolling_cache(rc: dict, device: str, out: Path) -> None:
    import matplotlib.pyplot as plt

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
    write_caller_tables(s, out)
    plot(s, out)
    plot_callers(s, out)
    return s
