"""Engine configuration: which model, where, how, and the limits every request is held to."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

MODES = ("eager", "compiled", "graphs", "hybrid")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# How the layers' matrices are stored: "dtype" (in --dtype) or "fp8" (e4m3 with one float32 scale per output row,
# quantized at load: hjcg.fp8; activations stay in --dtype). The lm head stays in --dtype either way: in fp8 it
# alone costs more perplexity than all the layers together (SmolLM2-135M-Instruct, float32 activations, GPL-3
# text, 7658 tokens in windows of 1024: 19.03 in float32, 19.10 fp8 layers (+0.39%), 19.33 fp8 layers and lm
# head (+1.58%, past the 1.5% bar), `python -m hjcg.perplexity`) to save 17% of SmolLM2's decode bytes in
# float16, 2% of Llama-2-7B's.
WEIGHTS = ("dtype", "fp8")
DEFAULT_DECODE_LOOKAHEAD = 2
MAX_DECODE_LOOKAHEAD = 3
# Prefill length buckets captured by default on CUDA: of the sets of 15 graphs, the one with the least mean
# replay time over prompt lengths 1..512 (bench.bucket_sweep.choose_buckets over the measured sweep,
# bench/results/2026-11-22-h100-sweep/bucket_sweep.json: H100, Llama-2-7B, random tokens). cuBLAS tiles the
# tokens, so time is not monotonic in length (400 tokens 10.58 ms, 416 11.61, 432 10.90): a bucket earns its
# place where it is faster than every longer one and serves enough lengths. Each graph holds ~0.15 MiB per
# bucket token (Llama-2-7B): this set ~0.65 GiB.
DEFAULT_PREFILL_BUCKETS = (48, 96, 128, 176, 208, 256, 288, 304, 336, 368, 384, 400, 432, 480, 512)
# With fp8 weights, prompts of up to 16 tokens run the fp8 GEMV (hjcg.fused_ops.FP8_GEMV_MAX_ROWS) rather than the
# fp8 GEMM that a 48-token bucket runs: the 32 layers' products at Llama-2-7B shapes take 3.39 ms for 16 rows
# (bench/results/2026-11-23-h100-fp8-tiles-lab) against 3.95-4.0 ms through torch._scaled_mm at 10-48 tokens
# (bench/results/2026-11-23-h100-fp8-lab). The GEMV's time grows with its rows (one tile of weight rows up to 8,
# two past 8), so the short buckets follow its steps: TTFT at exactly 8 / 10 / 12 / 16 tokens 3.84 / 3.95 / 3.97
# / 4.21 ms (bench/results/2026-11-24-h100-fp8-step-lab): a 10-token prompt gains 0.24 ms in bucket 12.
FP8_PREFILL_BUCKETS = (8, 12, 16, *DEFAULT_PREFILL_BUCKETS)
# The default buckets twice (a graph for one prompt and one for prompts packed together: hjcg.packing), and per
# batch bucket (1, 2, 4, ..., 32) a decode graph and the two halves of a constrained step.
DEFAULT_GRAPH_CACHE_ENTRIES = 56
DEFAULT_GRAPH_CACHE_MIB = 2048
# The most rows the tensor-core GEMV (csrc/gemv_mma_cuda.cu: the mma's m) takes, over fp16/bf16 weights as over fp8.
MMA_GEMV_MAX_ROWS = 16


@dataclass(slots=True)
class EngineConfig:
    model: str = "smollm2"            # "smollm2" (the embedded default) or a local checkpoint directory
    device: str = "auto"              # "auto", "cpu", "cuda", "cuda:N"
    dtype: str = "auto"               # "auto" (float32 on CPU, float16 on CUDA) or a DTYPES key
    mode: str = "auto"                # "auto" (eager on CPU, hybrid on CUDA) or one of MODES
    weights: str = "dtype"            # one of WEIGHTS
    max_context: int = 4096           # KV-cache length; prompt + generated tokens never exceed it
    max_prompt_tokens: int = 3072
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 256
    prefill_buckets: tuple[int, ...] | None = None  # None: FP8_PREFILL_BUCKETS with fp8 weights, else the default
    graph_cache_max_entries: int = DEFAULT_GRAPH_CACHE_ENTRIES
    graph_cache_max_bytes: int = DEFAULT_GRAPH_CACHE_MIB << 20
    max_batch: int = 32               # streams decoded together at most (decode graphs per batch bucket up to it)
    max_waiting: int = 64             # requests that may wait for a row; more are refused (QueueFull)
    kv_block_size: int = 16           # tokens per KV-cache block
    # Decode steps of up to gemv_max_rows rows run hjcg's CUDA-core GEMV, of up to mma_gemv_max_rows its tensor-core
    # GEMV, larger ones cuBLAS. Measured on the H100, the Llama-2-7B decode chain of products in one graph
    # (bench/results/2026-11-23-h100-mma-gemv-lab): CUDA cores 4.70 ms at 1 row, 4.83 at 2, 5.12 at 4, 6.04 at 8;
    # tensor cores 4.94, -, 5.00, 5.04, and 6.20 at 16; cuBLAS 5.05-5.14 at any of them.
    gemv_max_rows: int = 2
    mma_gemv_max_rows: int = 8
    # One arithmetic for a stream whatever its batch: decode steps of 1..MMA_GEMV_MAX_ROWS rows all run the
    # tensor-core GEMV (each row's bits the same at any of those sizes; gemv_max_rows and mma_gemv_max_rows are
    # set to match) and streams joining together prefill one by one, not packed. The default split above is
    # faster at 1-2 rows but rounds differently from 3 rows on, so in fp16/bf16 a stream's logits (and, rarely,
    # a sampled token) can change as its batch crosses 2 and 8 rows. Above MMA_GEMV_MAX_ROWS rows cuBLAS runs.
    batch_invariant: bool = False
    # The decode step's tensor-core GEMVs, rope_cache after a GEMV and the decode attention launched with
    # programmatic dependent launch (csrc/pdl.cuh; Hopper and newer, ignored before): each starts while the kernel
    # before it finishes, a GEMV streaming its first weights meanwhile (FusedCudaOps says which and why). Measured
    # on the H100, the Llama-2-7B decode chain of fp8 GEMVs 2.92 -> 2.81 ms, of tensor-core GEMVs over fp16 weights
    # 4.96 -> 4.70 (bench/results/2026-11-24-h100-pdl-lab). The arithmetic is the same either way; off only to
    # measure it.
    pdl: bool = True
    # Decode steps queued on the GPU beyond the one the host is reading back (CUDA; the CPU runs none
    # ahead). One hides the host's per-step work; two also hide the gRPC front's threads holding the GIL:
    # 8 streams over gRPC, inter-token p99 7.1 ms at 2 against 9.7-10.0 at 1, 1 stream 5.3-5.6 against
    # 7.2-8.1 (H100, Llama-2-7B, bench/results/2026-11-23-h100-lookahead-lab); 3 was worse again. A stream
    # that ends early (EOS, a stop, cancelled) holds its row that many steps longer.
    decode_lookahead: int = DEFAULT_DECODE_LOOKAHEAD
    kv_cache_gib: float = 0.0         # KV pool size; 0: kv_cache_fraction of free GPU memory (CUDA), 1 GiB (CPU)
    kv_cache_fraction: float = 0.5    # of the GPU memory free after loading the weights, when kv_cache_gib is 0
    cache_dir: str | None = None      # where converted GGUF weights are kept; None: ~/.cache/hjcg
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but torch sees no CUDA device")
        on_cuda = self.device.startswith("cuda")
        if self.dtype == "auto":
            self.dtype = "float16" if on_cuda else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS} ('dtype': in --dtype; 'fp8': e4m3 quantized at "
                             f"load), got {self.weights!r}")
        if self.mode == "auto":
            self.mode = "hybrid" if on_cuda else "eager"
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'auto' or one of {MODES}, got {self.mode!r}")
        if self.mode in ("graphs", "hybrid") and not on_cuda:
            raise ValueError(f"mode {self.mode!r} needs a CUDA device; use 'eager' or 'compiled' on the CPU")
        for name in ("max_context", "max_prompt_tokens", "max_new_tokens", "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_prompt_tokens >= self.max_context:
            raise ValueError("max_prompt_tokens must be smaller than max_context")
        self.default_max_new_tokens = min(self.default_max_new_tokens, self.max_new_tokens)
        if self.batch_invariant:
            self.gemv_max_rows, self.mma_gemv_max_rows = 0, MMA_GEMV_MAX_ROWS
        if not 0 <= self.gemv_max_rows <= 8:
            raise ValueError("gemv_max_rows must be in [0, 8] (the GEMV takes at most 8 rows)")
        if not 0 <= self.mma_gemv_max_rows <= MMA_GEMV_MAX_ROWS:
            raise ValueError(f"mma_gemv_max_rows must be in [0, {MMA_GEMV_MAX_ROWS}] (the tensor-core GEMV takes at "
                             f"most {MMA_GEMV_MAX_ROWS} rows)")
        if not 0 <= self.decode_lookahead <= MAX_DECODE_LOOKAHEAD:
            raise ValueError(f"decode_lookahead must be in [0, {MAX_DECODE_LOOKAHEAD}]")
        for name in ("max_batch", "max_waiting", "kv_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kv_cache_gib < 0 or not 0 < self.kv_cache_fraction <= 0.95:
            raise ValueError("kv_cache_gib must be >= 0 and kv_cache_fraction in (0, 0.95]")
        if self.prefill_buckets is None:
            self.prefill_buckets = FP8_PREFILL_BUCKETS if self.weights == "fp8" else DEFAULT_PREFILL_BUCKETS
        buckets = tuple(sorted(set(int(b) for b in self.prefill_buckets)))
        if not buckets or buckets[0] < 1:
            raise ValueError("prefill_buckets must be positive lengths")
        self.prefill_buckets = buckets

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def fit_to_model(config: EngineConfig, max_positions: int | None) -> EngineConfig:
    """`config` with max_context capped at the model's own limit (max_position_embeddings of its HF config)
    and max_prompt_tokens following it, with a warning that says so; `config` itself when it fits.

    Positions past that limit were never trained (the output there is not to be trusted), so the model's
    figure wins over --max-context. Capped rather than refused, so that the default 4096 serves a smaller
    model; an explicit larger value is not honoured either, and the warning names both figures.
    """
    if not max_positions or max_positions < 1 or config.max_context <= max_positions:
        return config
    prompt = min(config.max_prompt_tokens, max_positions - 1)
    log.warning("max_context %d (--max-context) exceeds the %d positions the model supports "
                "(max_position_embeddings): serving a context of %d tokens%s", config.max_context, max_positions,
                max_positions, f", prompts of at most {prompt}" if prompt != config.max_prompt_tokens else "")
    return dataclasses.replace(config, max_context=max_positions, max_prompt_tokens=prompt)
