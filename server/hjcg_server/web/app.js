"use strict";
// hjcg's built-in page: a chat streamed from /v1/chat/completions (server-sent events read from fetch's
// ReadableStream, since EventSource cannot POST or send a bearer token) and a view of /hjcg/stats polled
// every second. No libraries: the page must work on a machine with no internet.

const $ = (id) => document.getElementById(id);
// every second; ?refresh=MS asks for another interval (the browser test polls faster to catch short streams)
const POLL_MS = Math.max(100, Number(new URLSearchParams(location.search).get("refresh")) || 1000);
const TOKEN_KEY = "hjcg.token";

const conversation = [];  // {role, content} as sent to the server; the page's only copy
let modelId = null;       // from /v1/models, else the stats' model name
let inFlight = null;      // the AbortController of the streaming request

// --- helpers ---------------------------------------------------------------------------------------------

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function errorMessage(response) {
  // OpenAI's error shape {"error": {"message"}}, FastAPI's {"detail"}, or plain text
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body.error && body.error.message) return body.error.message;
    if (body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) { /* not JSON */ }
  return text || response.statusText;
}

function fmtMs(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const ms = seconds * 1000;
  return ms >= 1000 ? `${(ms / 1000).toFixed(ms >= 10000 ? 0 : 1)} s` : `${ms >= 10 ? ms.toFixed(0) : ms.toFixed(1)} ms`;
}

function fmtBytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtDuration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  return m ? `${m}m ${s % 60}s` : `${s}s`;
}

// --- chat ------------------------------------------------------------------------------------------------

function addMessage(role, text) {
  $("empty").hidden = true;
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  el.appendChild(content);
  if (role === "assistant") {
    const meta = document.createElement("div");
    meta.className = "meta";
    el.appendChild(meta);
    el.dataset.chunks = "0";
  }
  $("conversation").appendChild(el);
  scrollDown();
  return el;
}

function scrollDown() {
  const box = $("conversation");
  box.scrollTop = box.scrollHeight;
}

function numberField(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = {
    model: modelId || "hjcg",
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberField("temperature") ?? 0,
    top_p: numberField("top_p") ?? 1,
    max_tokens: numberField("max_tokens") ?? 128,
  };
  const seed = numberField("seed");
  if (seed !== null) body.seed = seed;
  if ($("json_mode").checked) body.response_format = { type: "json_object" };
  return body;
}

// Yields each event's data field from a server-sent event stream, as the bytes arrive.
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      // line ends may be \r\n or \r; a \r last in a read waits, since its \n may come in the next one
      const held = !done && buffer.endsWith("\r") ? 1 : 0;
      buffer = buffer.slice(0, buffer.length - held).replace(/\r\n?/g, "\n") + buffer.slice(buffer.length - held);
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
        if (data.length) yield data.join("\n");
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {});  // the caller stopped early ([DONE], an error): let the connection go
  }
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const el = addMessage("assistant", "");
  const content = el.querySelector(".content");
  const meta = el.querySelector(".meta");
  el.dataset.state = "streaming";
  setBusy(true);
  const controller = new AbortController();
  inFlight = controller;
  const started = performance.now();
  let firstAt = null, chunks = 0, usage = null, finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(`${response.status}: ${await errorMessage(response)}`);
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        if (firstAt === null) firstAt = performance.now();
        content.textContent += piece;
        el.dataset.chunks = String(++chunks);
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    el.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      el.dataset.state = "stopped";
      finish = "stopped";
    } else {
      el.dataset.state = "error";
      el.classList.add("error");
      meta.textContent = err.message;
    }
  } finally {
    inFlight = null;
    setBusy(false);
  }
  if (el.dataset.state === "error") {
    conversation.pop();  // the question that failed is not part of the conversation sent next time
    return;
  }
  conversation.push({ role: "assistant", content: content.textContent });
  meta.textContent = answerSummary(started, firstAt, chunks, usage, finish);
}

function answerSummary(started, firstAt, chunks, usage, finish) {
  const now = performance.now();
  const tokens = usage ? usage.completion_tokens : chunks;
  const parts = [];
  if (finish) parts.push(finish);
  parts.push(`${tokens} tokens`);
  if (firstAt !== null) {
    parts.push(`first after ${fmtMs((firstAt - started) / 1000)}`);
    if (tokens > 1 && now > firstAt) parts.push(`${((tokens - 1) / ((now - firstAt) / 1000)).toFixed(1)} tokens/s`);
  }
  if (usage) parts.push(`prompt ${usage.prompt_tokens}`);
  return parts.join(" · ");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || inFlight) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => inFlight && inFlight.abort());
$("clear").addEventListener("click", () => {
  if (inFlight) inFlight.abort();
  conversation.length = 0;
  document.querySelectorAll("#conversation .msg").forEach((el) => el.remove());
  $("empty").hidden = false;
});

// --- live view -------------------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

// A bucket's upper bound as an axis label: milliseconds as plain numbers, seconds with "s".
function boundLabel(le) {
  if (le === null) return "∞";
  const ms = le * 1000;
  return ms >= 1000 ? `${ms / 1000}s` : `${ms}`;
}

// The bucket whose upper bound the q-quantile lies under (Prometheus buckets give no finer answer).
function quantileBound(h, q) {
  let seen = 0;
  const target = q * h.count;
  for (let i = 0; i < h.counts.length; i++) {
    seen += h.counts[i];
    if (seen >= target) return h.le[i];
  }
  return null;
}

// Bars for one histogram, from one bucket below the first observation to one above the last.
function drawHistogram(box, h) {
  box.dataset.count = String(h.count);
  box.replaceChildren();
  const used = h.counts.map((c, i) => (c > 0 ? i : -1)).filter((i) => i >= 0);
  let lo = used.length ? Math.max(0, used[0] - 1) : 2;
  let hi = used.length ? Math.min(h.counts.length - 1, used[used.length - 1] + 1) : 9;
  while (hi - lo < 7) { if (lo > 0) lo--; if (hi - lo < 7 && hi < h.counts.length - 1) hi++; else if (lo === 0) break; }
  const counts = h.counts.slice(lo, hi + 1);
  const bounds = h.le.slice(lo, hi + 1);
  const W = 300, H = 72, base = 56, top = 10;
  const every = Math.ceil(counts.length / 12);  // tick labels that fit side by side
  const step = W / counts.length;
  const peak = Math.max(1, ...counts);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `${h.count} observations` });
  svg.appendChild(svgEl("line", { x1: 0, y1: base + 0.5, x2: W, y2: base + 0.5, class: "axis" }));
  counts.forEach((c, i) => {
    const height = c ? Math.max(2, ((base - top) * c) / peak) : 0;
    const x = i * step + step * 0.12;
    const rect = svgEl("rect", { x, y: base - height, width: step * 0.76, height, rx: 2, class: "bar-rect" });
    const title = svgEl("title", {});
    title.textContent = bounds[i] === null ? `above the last bound: ${c}` : `≤ ${fmtMs(bounds[i])}: ${c}`;
    rect.appendChild(title);
    svg.appendChild(rect);
    if (c) {
      const label = svgEl("text", { x: x + step * 0.38, y: base - height - 2, "text-anchor": "middle" });
      label.textContent = String(c);
      svg.appendChild(label);
    }
    if ((counts.length - 1 - i) % every === 0) {
      const tick = svgEl("text", { x: x + step * 0.38, y: H - 4, "text-anchor": "middle" });
      tick.textContent = boundLabel(bounds[i]);
      svg.appendChild(tick);
    }
  });
  box.appendChild(svg);
}

function histogramText(h) {
  if (!h.count) return "no requests yet";
  return `n ${h.count} · mean ${fmtMs(h.sum_s / h.count)} · p50 ≤ ${fmtMs(quantileBound(h, 0.5))}` +
    ` · p99 ≤ ${fmtMs(quantileBound(h, 0.99))}`;
}

function showStats(s) {
  const m = s.model;
  $("model-line").textContent = `${m.name} · ${m.weights === m.dtype ? m.dtype : `${m.weights} weights, ${m.dtype}`}` +
    ` · ${m.context_length} context · ${s.device}`;
  if (!modelId) modelId = m.name;
  $("live-running").textContent = s.running;
  $("live-running-of").textContent = `of ${s.max_batch} rows`;
  $("live-waiting").textContent = s.waiting;
  $("live-waiting-of").textContent = s.queue_size === null ? "" : `of ${s.queue_size}`;
  $("live-bucket").textContent = s.batch_bucket;
  $("live-bucket-of").textContent = s.running ? `for ${s.running} stream${s.running > 1 ? "s" : ""}` : "idle";
  $("live-uptime").textContent = fmtDuration(s.uptime_s);
  $("live-mode").textContent = `mode ${s.mode}`;

  const kv = s.kv;
  const share = kv.blocks_total ? kv.blocks_used / kv.blocks_total : 0;
  $("kv-fill").style.width = `${Math.max(share > 0 ? 1 : 0, share * 100)}%`;
  $("kv-fill").parentElement.setAttribute("aria-valuenow", kv.blocks_used);
  $("kv-fill").parentElement.setAttribute("aria-valuemax", kv.blocks_total);
  $("kv-text").textContent = `${kv.blocks_used} / ${kv.blocks_total} blocks · ${(share * 100).toFixed(1)}%` +
    ` · ${kv.block_size} tokens/block · ${fmtBytes(kv.bytes_total)}`;
  $("kv-text").dataset.used = String(kv.blocks_used);

  const g = s.graph_cache;
  $("graph-text").textContent = Object.keys(g).length === 0
    ? `no CUDA graphs (${s.mode} on ${s.device})`
    : `${g.entries} graphs · ${fmtBytes(g.bytes)} · ${g.hits} hits · ${g.misses} misses · ` +
      `${g.captures} captures · ${g.evictions} evictions`;

  drawHistogram($("ttft-plot"), s.ttft);
  $("ttft-text").textContent = histogramText(s.ttft);
  drawHistogram($("itl-plot"), s.inter_token);
  $("itl-text").textContent = histogramText(s.inter_token);

  const r = s.requests;
  const statuses = Object.entries(r.by_status).map(([code, n]) => `${code} ${n}`).join(", ") || "none yet";
  $("requests-text").textContent = `${statuses} · ${r.generation_tokens} tokens generated, ${r.prompt_tokens} read`;
}

function setLiveStatus(text, kind) {
  const pill = $("live-status");
  pill.textContent = text;
  pill.className = `pill ${kind}`;
}

async function poll() {
  try {
    const response = await fetch("/hjcg/stats", { headers: authHeaders(), cache: "no-store" });
    if (response.ok) {
      showStats(await response.json());
      setLiveStatus("live", "ok");
    } else if (response.status === 401) {
      setLiveStatus("token needed", "bad");
    } else if (response.status === 503) {
      setLiveStatus("loading model", "bad");
    } else {
      setLiveStatus(`error ${response.status}`, "bad");
    }
  } catch (_) {
    setLiveStatus("unreachable", "bad");
  }
  setTimeout(poll, POLL_MS);  // after the answer, so a slow server never gets overlapping polls
}

async function loadModelId() {
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (response.ok) {
      const models = (await response.json()).data || [];
      if (models.length) modelId = models[0].id;
    }
  } catch (_) { /* the stats' model name serves */ }
}

// --- start -----------------------------------------------------------------------------------------------

$("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
$("token").addEventListener("change", () => {
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  loadModelId();
});
loadModelId();
poll();
