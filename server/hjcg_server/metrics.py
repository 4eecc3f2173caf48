"""Prometheus metrics, named like the rest of the field (vLLM's) under an hjcg_ prefix."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("hjcg_time_to_first_token_seconds", "Time to first token, queue included",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("hjcg_inter_token_latency_seconds", "Time between consecutive tokens",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("hjcg_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("hjcg_request_queue_time_seconds", "Time a request waited in the queue",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hjcg_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("hjcg_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("hjcg_request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=r)
        self.status = Counter("hjcg_requests_by_status", "Generate RPCs by gRPC status code", ["code"], registry=r)
        self.waiting = Gauge("hjcg_num_requests_waiting", "Requests waiting in the queue", registry=r)
        self.running = Gauge("hjcg_num_requests_running", "Requests being generated", registry=r)
        self.batch_bucket = Gauge("hjcg_batch_bucket", "Batch size of the decode graph serving the running requests",
                                  registry=r)
        self.kv_usage = Gauge("hjcg_kv_cache_usage_ratio", "Fraction of the KV cache's blocks in use", registry=r)
        self.graph_captures = Gauge("hjcg_graph_cache_captures", "CUDA graphs captured", registry=r)
        self.graph_hits = Gauge("hjcg_graph_cache_hits", "CUDA graph cache hits (replays of a cached graph)", registry=r)
        self.graph_evictions = Gauge("hjcg_graph_cache_evictions", "CUDA graphs evicted", registry=r)
        self.graph_bytes = Gauge("hjcg_graph_cache_bytes", "GPU memory held by cached CUDA graphs", registry=r)

    def job_finished(self, finish, total_ms: float, queue_ms: float) -> None:
        """A generation job's end (a hjcg.engine.Finish), counted the same way for gRPC and HTTP requests."""
        self.e2e.observe(total_ms / 1e3)
        self.queue_time.observe(queue_ms / 1e3)
        self.prompt_tokens.inc(finish.prompt_tokens)
        self.generation_tokens.inc(finish.completion_tokens)
        self.finished.labels(finished_reason=finish.reason).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def watch(self, worker, engine) -> None:
        """Gauges read the worker's queue and the graph cache at scrape time, never a stale copy."""
        self.waiting.set_function(lambda: engine.stats()["waiting"])
        self.running.set_function(lambda: engine.stats()["running"])
        self.batch_bucket.set_function(lambda: engine.stats()["batch_bucket"])
        self.kv_usage.set_function(lambda: engine.stats()["kv_blocks_used"] / max(1, engine.stats()["kv_blocks_total"]))
        for gauge, key in ((self.graph_captures, "captures"), (self.graph_hits, "hits"),
                           (self.graph_evictions, "evictions"), (self.graph_bytes, "bytes")):
            gauge.set_function(lambda key=key: engine.graph_stats().get(key, 0))
