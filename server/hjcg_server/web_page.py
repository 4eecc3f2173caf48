"""The built-in page of the HTTP front: GET / (a chat and a live view of the server), its static files under
/static/, and GET /hjcg/stats, the JSON figures the live view polls.

The page and its files carry nothing secret and are served to anyone who reaches the port; the stats
route sits behind the same bearer token as the OpenAI routes (the page has a field for it).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import Counter, Histogram

from hjcg_server.openai_errors import OpenAIError

WEB_DIR = Path(__file__).resolve().parent / "web"


def install(app: FastAPI) -> None:
    """Adds GET /, GET /static/... and GET /hjcg/stats to the HTTP front's app."""
    # imported here: openai_api builds the app that calls install(), so a module-level import would be circular
    from hjcg_server.openai_api import require_token

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="hjcg-static")
    app.add_api_route("/", _index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/hjcg/stats", _stats, methods=["GET"], dependencies=[Depends(require_token)],
                      summary="hjcg's live figures: model, batch, queue, KV cache, graph cache, latency histograms")


async def _index() -> FileResponse:
    # no-cache: after an upgrade the browser revalidates instead of keeping an old page against a new API
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _stats(request: Request) -> JSONResponse:
    state = request.app.state.hjcg
    if state.engine is None:  # still answers while draining: the live view shows the last streams end
        raise OpenAIError(503, "the model is still loading; retry shortly", code="model_loading")
    return JSONResponse(stats(state), headers={"Cache-Control": "no-store"})


def stats(state: Any) -> dict:
    """The live figures of a loaded server; state has engine, worker, metrics and started (time.monotonic())."""
    engine, metrics = state.engine, state.metrics
    figures = engine.stats()
    worker = state.worker
    return {
        "model": engine.model_info(),
        "device": engine.device_name(),
        "mode": engine.config.mode,
        "uptime_s": round(time.monotonic() - state.started, 3),
        "running": figures["running"],
        "waiting": figures["waiting"],
        "queue_size": worker.queue_size if worker is not None else None,
        "batch_bucket": figures["batch_bucket"],
        "max_batch": engine.config.max_batch,
        "kv": {"blocks_used": figures["kv_blocks_used"], "blocks_total": figures["kv_blocks_total"],
               "block_size": figures["kv_block_size"], "bytes_total": figures["kv_bytes_total"]},
        "graph_cache": engine.graph_stats(),
        "ttft": histogram(metrics.ttft),
        "inter_token": histogram(metrics.inter_token),
        "requests": {
            "by_status": labelled_totals(metrics.status, "code"),
            "by_finish": labelled_totals(metrics.finished, "finished_reason"),
            "prompt_tokens": counter_total(metrics.prompt_tokens),
            "generation_tokens": counter_total(metrics.generation_tokens),
        },
    }


def histogram(h: Histogram) -> dict:
    """A histogram as the page plots it: each bucket's upper bound in seconds (the last, +Inf, as None, which
    JSON can carry) and the observations in that bucket alone, not Prometheus' cumulative counts."""
    bounds: list[float | None] = []
    cumulative: list[float] = []
    count = total = 0.0
    for metric in h.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                bounds.append(None if math.isinf(le) else le)
                cumulative.append(sample.value)
            elif sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    counts = [int(c - p) for c, p in zip(cumulative, [0.0] + cumulative[:-1])]
    return {"le": bounds, "counts": counts, "count": int(count), "sum_s": total}


def labelled_totals(counter: Counter, label: str) -> dict[str, int]:
    """A labelled counter's totals, e.g. {"OK": 12, "CANCELLED": 1}."""
    return {sample.labels[label]: int(sample.value) for metric in counter.collect()
            for sample in metric.samples if sample.name.endswith("_total")}


def counter_total(counter: Counter) -> int:
    return int(sum(sample.value for metric in counter.collect()
                   for sample in metric.samples if sample.name.endswith("_total")))
