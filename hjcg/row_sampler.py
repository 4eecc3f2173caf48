"""The sampler state of the running batch: one row per stream, in device tensors the fused sampling kernel
(or its torch twin) reads and advances, so the decode graph samples every row with no host round trip.

Row r holds stream r's parameters, seed, draw counter and token history (the repetition penalty's
window). A stream's row is loaded when it joins; when streams leave, the rows close up (compact).
"""
from __future__ import annotations

import torch

import hjcg.native  # noqa: F401  (registers torch.ops.hjcg)
from hjcg.upload import upload
from hjcg.sampling import SamplingParams


class RowSampler:
    def __init__(self, device: torch.device, rows: int, history_capacity: int, kernel: bool = True):
        self.kernel = kernel  # hjcg's sampling kernel (CPU or CUDA), else the torch sampler ("graphs" ablation)
        off = SamplingParams()
        # [4, R] floats and [3, R] ints: a joining stream's scalars arrive in two copies; row views are contiguous
        self._floats = torch.tensor([[off.temperature], [off.top_p], [off.min_p], [off.repetition_penalty]],
                                    device=device, dtype=torch.float32).repeat(1, rows)
        self._ints = torch.zeros(3, rows, device=device, dtype=torch.int64)
        self.top_k = torch.zeros(rows, device=device, dtype=torch.int32)
        self.history = torch.zeros(rows, history_capacity, device=device, dtype=torch.int64)

    def load(self, row: int, params: SamplingParams, prompt: torch.Tensor) -> None:
        """Row `row` takes a new stream: its parameters, a fresh draw counter and its prompt as history
        (prompt on the device). The scalars travel through pinned memory: the host never waits."""
        self.load_rows(row, [params], [prompt])

    def load_rows(self, start: int, params: list[SamplingParams], prompts: list[torch.Tensor]) -> None:
        """Rows [start, start + K) take K new streams (load() for each, the scalars in one copy per kind)."""
        end = start + len(params)
        device = self.top_k.device
        lengths = [min(p.numel(), self.history.shape[1]) for p in prompts]
        floats = [[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params],
                  [p.repetition_penalty for p in params]]
        self._floats[:, start:end].copy_(upload(floats, torch.float32, device))
        ints = [[p.kernel_seed() for p in params], [0] * len(params), lengths]
        self._ints[:, start:end].copy_(upload(ints, torch.int64, device))
        # int32 from a Python int would be a synchronous pageable copy: the host would wait for the prefill
        self.top_k[start:end].copy_(upload([p.top_k for p in params], torch.int32, device))
        for row, (prompt, n) in enumerate(zip(prompts, lengths), start):
            self.history[row, :n].copy_(prompt[:n])

    def compact(self, order: torch.Tensor) -> None:
        """Row i takes what row order[i] held (order on the device, [m])."""
        m = order.numel()
        for t, dim in ((self._floats, 1), (self._ints, 1), (self.top_k, 0), (self.history, 0)):
            rows = t.index_select(dim, order)
            (t[:, :m] if dim == 1 else t[:m]).copy_(rows)

    def sample(self, logits: torch.Tensor, start: int, out: torch.Tensor) -> None:
        """Samples rows [start, start + B) from logits [B, V] into out [B] (int64), advancing their state."""
        end = start + logits.shape[0]
        f, i = self._floats[:, start:end], self._ints[:, start:end]
        args = (logits, self.history[start:end], i[2], f[0], self.top_k[start:end], f[1], f[2], f[3], i[0], i[1], out)
        if self.kernel:
            torch.ops.hjcg.sample(*args, True)
        else:
            from hjcg.torch_sampler import sample_rows  # imports this module's neighbour hjcg.sampling

            sample_rows(*args, True)
