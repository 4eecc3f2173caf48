"""Many callers of one server: a pool of client processes, each with its own HjcgClient, that stream
Generate calls and stamp every token's arrival with time.perf_counter() (CLOCK_MONOTONIC on Linux, so
stamps from different processes compare).

Torch-free on purpose: the workers are spawned, and a spawned worker imports this module (and the
bench package), never torch.

  ClientPool(target, size)    start `size` worker processes, each connected before it reports ready
    .together(ids_per_client) one call per client, all released by one barrier; returns the streams
    .open_loop(schedule, ...) calls sent at fixed times (each in its own thread of its worker, so a busy
                              client never delays an arrival); returns the streams
A stream is a dict: send (s), stamps (token arrival times, s), error (gRPC status name or None),
prompt_tokens, max_new_tokens; `scheduled` too for open-loop calls.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import random
import statistics
import threading
import time
import traceback

now = time.perf_counter


# --- one stream --------------------------------------------------------------------------------------------

def stream(client, ids: list[int], max_new_tokens: int, deadline: float | None = None) -> dict:
    """One greedy Generate call with EOS ignored; every token message stamped on arrival."""
    import grpc

    timeout = None if deadline is None else max(0.001, deadline - now())
    record = {"prompt_tokens": len(ids), "max_new_tokens": max_new_tokens, "error": None, "finish": None}
    stamps: list[float] = []
    send = now()
    try:
        for response in client.generate(token_ids=ids, max_new_tokens=max_new_tokens, ignore_eos=True,
                                         timeout=timeout):
            if response.HasField("token"):
                stamps.append(now())
            else:
                record["finish"] = response.finish.reason
    except grpc.RpcError as e:
        record["error"] = e.code().name if hasattr(e, "code") else type(e).__name__
    except Exception as e:  # recorded, not raised: one failed call must not sink the run
        record["error"] = f"{type(e).__name__}: {e}"
    record.update(send=send, stamps=stamps)
    return record


# --- the worker process ----------------------------------------------------------------------------------

def _worker(index: int, target: str, inbox, outbox, barriers: dict) -> None:
    try:
        import grpc

        from hjcg_client import HjcgClient

        client = HjcgClient(target)
        grpc.channel_ready_future(client.channel).result(timeout=120)
        outbox.put(("ready", index, None))
    except Exception:
        outbox.put(("failed", index, traceback.format_exc()))
        return
    while True:
        job = inbox.get()
        if job is None:
            break
        kind, payload = job
        try:
            if kind == "together":
                barriers[payload["n"]].wait(timeout=300)
                records = [stream(client, payload["ids"], payload["max_new_tokens"], payload.get("deadline"))]
            elif kind == "schedule":
                records = _run_schedule(client, payload)
            else:
                raise ValueError(f"unknown job {kind!r}")
            outbox.put(("done", index, records))
        except Exception:
            outbox.put(("failed", index, traceback.format_exc()))
    client.close()


def _run_schedule(client, payload: dict) -> list[dict]:
    """Sends each call at t0 + its offset, each in its own thread; returns when all have ended."""
    t0, deadline = payload["t0"], payload["deadline"]
    records: list[dict] = []
    threads = []

    def one(item: dict, scheduled: float) -> None:
        record = stream(client, item["ids"], item["max_new_tokens"], deadline)
        record.update(scheduled=scheduled, request=item["request"])
        records.append(record)  # list.append is atomic

    for item in payload["requests"]:  # in order of offset
        scheduled = t0 + item["offset"]
        delay = scheduled - now()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(item, scheduled), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return records


# --- the pool ------------------------------------------------------------------------------------------------

class ClientPool:
    def __init__(self, target: str, size: int, levels: tuple[int, ...] = (), start_timeout: float = 180.0):
        ctx = mp.get_context("spawn")
        self.size = size
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(size)]
        # one barrier per group size (a barrier can reach a spawned process only as an argument)
        self._barriers = {n: ctx.Barrier(n) for n in sorted(set(levels) | {size})}
        self._procs = [ctx.Process(target=_worker, args=(i, target, self._inboxes[i], self._outbox, self._barriers),
                                   daemon=True, name=f"bench-client-{i}") for i in range(size)]
        for p in self._procs:
            p.start()
        ready = self._collect(size, start_timeout, expect="ready")
        if len(ready) != size:
            self.close()
            raise RuntimeError(f"{len(ready)} of {size} client processes connected to {target}")

    @property
    def pids(self) -> list[int]:
        """The client processes' ids (a lab's CPU accounting groups their threads by them)."""
        return [p.pid for p in self._procs]

    def _collect(self, count: int, timeout: float, expect: str = "done") -> list:
        """`count` answers from the workers; a worker's traceback is raised here."""
        out, deadline = [], time.monotonic() + timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(out)} of {count} client processes answered in {timeout:.0f} s")
            try:
                kind, index, value = self._outbox.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"client processes died: {dead}")
                continue
            if kind == "failed":
                raise RuntimeError(f"client process {index} failed:\n{value}")
            if kind != expect:
                raise RuntimeError(f"client process {index} answered {kind!r}, expected {expect!r}")
            out.append(value)
        return out

    def together(self, ids_per_client: list[list[int]], max_new_tokens: int, timeout: float = 600.0) -> list[dict]:
        """Clients 0..n-1 each send one call, all released by one barrier."""
        n = len(ids_per_client)
        if n not in self._barriers or n > self.size:
            raise ValueError(f"no barrier for {n} clients (levels: {sorted(self._barriers)})")
        deadline = now() + timeout
        for i, ids in enumerate(ids_per_client):
            self._inboxes[i].put(("together", {"n": n, "ids": ids, "max_new_tokens": max_new_tokens,
                                               "deadline": deadline}))
        return [r for records in self._collect(n, timeout + 60) for r in records]

    def open_loop(self, requests: list[dict], lead_s: float = 0.5, tail_s: float = 30.0) -> tuple[float, list[dict]]:
        """requests: dicts with offset (s after the start), ids, max_new_tokens, in order of offset; spread
        round-robin over the clients. Calls still running `tail_s` after the last arrival are cut off by
        their deadline (error DEADLINE_EXCEEDED). Returns (t0, streams)."""
        t0 = now() + lead_s
        last = max((r["offset"] for r in requests), default=0.0)
        deadline = t0 + last + tail_s
        shares: list[list[dict]] = [[] for _ in range(self.size)]
        for i, r in enumerate(requests):
            shares[i % self.size].append(dict(r, request=i))
        busy = [i for i, share in enumerate(shares) if share]
        for i in busy:
            self._inboxes[i].put(("schedule", {"t0": t0, "deadline": deadline, "requests": shares[i]}))
        records = [r for records in self._collect(len(busy), lead_s + last + tail_s + 120) for r in records]
        return t0, sorted(records, key=lambda r: r["request"])

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- workloads and figures -----------------------------------------------------------------------------------

def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def poisson_schedule(rate: float, count: int, vocab: int, prompt_range: tuple[int, int],
                     new_range: tuple[int, int], seed: int) -> list[dict]:
    """`count` arrivals of a Poisson process of `rate` per second (the first at 0), prompt lengths and
    max_new_tokens uniform in their (inclusive) ranges, all from one seed."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(count):
        if i:
            t += rng.expovariate(rate)
        out.append({"offset": t, "ids": random_ids(rng, rng.randint(*prompt_range), vocab),
                    "max_new_tokens": rng.randint(*new_range)})
    return out


def compact(records: list[dict], t0: float) -> list[dict]:
    """Streams as stored in raw.json: times in ms relative to t0 (send, end) or to the stream (ttft, itl)."""
    out = []
    for r in records:
        s = r["stamps"]
        c = {"prompt_tokens": r["prompt_tokens"], "max_new_tokens": r["max_new_tokens"], "tokens": len(s),
             "send_ms": round((r["send"] - t0) * 1e3, 4), "error": r["error"], "finish": r["finish"]}
        if "scheduled" in r:
            c["scheduled_ms"] = round((r["scheduled"] - t0) * 1e3, 4)
        if s:
            c["ttft_ms"] = round((s[0] - r["send"]) * 1e3, 4)
            c["end_ms"] = round((s[-1] - t0) * 1e3, 4)
            c["itl_ms"] = [round((b - a) * 1e3, 4) for a, b in zip(s, s[1:])]
        out.append(c)
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (as bench.common.summary takes its p99); None when empty."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def stream_figures(streams: list[dict]) -> dict:
    """Aggregate figures of a set of compact streams: tokens/s over the span from the first send to the
    last token, TTFT over the streams, inter-token intervals pooled over every stream."""
    ok = [s for s in streams if s.get("tokens")]
    ttft = [s["ttft_ms"] for s in ok]
    itl = [x for s in ok for x in s["itl_ms"]]
    tokens = sum(s["tokens"] for s in streams)
    span_ms = (max(s["end_ms"] for s in ok) - min(s["send_ms"] for s in streams)) if ok else 0.0
    errors: dict[str, int] = {}
    for s in streams:
        if s["error"]:
            errors[s["error"]] = errors.get(s["error"], 0) + 1
    # most streams between their first and last token at once (1 when the server serves one at a time)
    edges = sorted([(s["send_ms"] + s["ttft_ms"], 1) for s in ok] + [(s["end_ms"], -1) for s in ok])
    peak = running = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return {"streams": len(streams), "completed": sum(1 for s in streams if not s["error"]), "errors": errors,
            "peak_streams_in_flight": peak,
            "tokens": tokens, "span_s": span_ms / 1e3, "tokens_per_s": tokens / (span_ms / 1e3) if span_ms > 0 else 0.0,
            "ttft_samples": len(ttft), "itl_samples": len(itl),
            "ttft_median_ms": median(ttft), "ttft_p99_ms": percentile(ttft, 99),
            "itl_median_ms": median(itl), "itl_p99_ms": percentile(itl, 99)}
