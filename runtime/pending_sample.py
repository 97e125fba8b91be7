"""A sampling step launched on the device, and its result on the host.

`Sampler.launch` queues a step's sampling and returns a `PendingSample`: the tokens (and the
logprob tensors) stay on the device, where the next step's inputs can read them, while
non-blocking copies into pinned host memory are queued behind them; `result()` waits for those
copies alone (an event), not for whatever was queued after them (the next step's forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kiln.runtime.sampling_params import Logprob

if TYPE_CHECKING:
    from kiln.runtime.sampler import SamplingState


@dataclass
class SampleResult:
    """The tokens chosen in one step, one per row."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]
    """Per row, None unless params.logprobs is set; else the chosen token's Logprob and the
    top-N tokens' (ranks 1..N), from log_softmax of the raw logits."""


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """values as int64 on device, copied without waiting for the work queued there (a plain
    torch.tensor(..., device=cuda) copies from pageable memory and synchronizes the stream)."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def logprob_tensors(raw: torch.Tensor, tokens: torch.Tensor, states: list[SamplingState],
                     rows: list[int]) -> list[torch.Tensor]:
    """For the rows that want logprobs, from log_softmax(raw) [B, V] and the chosen tokens [B]:
    the chosen logprob [R], its rank [R] and the top-N logprobs and ids [R, n]; [] for no rows."""
    if not rows:
        return []
    dev = raw.device
    idx = index_tensor(rows, dev)
    lp = raw[idx].log_softmax(dim=-1)  # [R, V]
    chosen_lp = lp.gather(1, tokens[idx].unsqueeze(1))  # [R, 1]
    ranks = (lp > chosen_lp).sum(dim=-1) + 1  # [R]
    n = min(max(states[i].params.logprobs for i in rows), lp.shape[1])
    top_lp, top_ids = lp.topk(n, dim=-1)  # [R, n] each
    return [chosen_lp.squeeze(1), ranks, top_lp, top_ids]


@dataclass
class PendingSample:
    """One step's tokens, launched on the device: `result()` waits for them (the copies to the
    host were queued right after the sampling kernels, so only this step is waited for)."""

    states: list[SamplingState]
    lp_rows: list[int]
    """The rows that want logprobs."""
    device: list[torch.Tensor]
    """The tokens [B], then the logprob tensors of `logprob_tensors`, on the device."""
    token_ids: list[int] | None = None
    """The tokens when already on the host."""
    host: list[torch.Tensor] = field(init=False)
    event: torch.cuda.Event | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.host = self.device
        if self.device[0].is_cuda:  # pinned copies that do not wait for the queued work
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                         for t in self.device]
            self.event = torch.cuda.Event()
            self.event.record()

    @property
    def tokens(self) -> torch.Tensor:
        """The tokens on the device [B] (int64)."""
        return self.device[0]

    def result(self) -> SampleResult:
        """The tokens and logprobs on the host (waits for this step's sampling only)."""
        if self.event is not None:
            self.event.synchronize()
        token_ids = self.token_ids if self.token_ids is not None else self.host[0].tolist()
        out: list[dict[int, Logprob] | None] = [None] * len(self.states)
        if self.lp_rows:
            chosen_l, ranks_l, top_lp_l, top_ids_l = (t.tolist() for t in self.host[1:])
            for r, i in enumerate(self.lp_rows):
                d = {token_ids[i]: Logprob(chosen_l[r], rank=ranks_l[r])}
                for k in range(min(self.states[i].params.logprobs, len(top_ids_l[r]))):
                    d[top_ids_l[r][k]] = Logprob(top_lp_l[r][k], rank=k + 1)
                out[i] = d
        return SampleResult(token_ids, out)
