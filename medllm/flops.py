"""Model FLOPs of a decoder-only transformer and the matrix-product peak of this machine, for model FLOPs
utilisation (MFU) = achieved model FLOP/s / measured peak FLOP/s.

Convention (PaLM, Chowdhery et al. 2022, appendix B): a token costs ``2 N`` FLOPs forward, where ``N`` counts
the weights of every matrix product (attention q/k/v/o, MLP, and the output head; not the embedding lookup,
biases or norms), plus ``4 L H d_head T`` for the attention scores and the weighted sum over a context of
``T`` tokens. Training is forward + backward = 3 forward passes (``6 N + 12 L H d_head T``) whether the
weights are trained in full or through LoRA (the backward pass through a frozen base still costs its
activation gradients; LoRA's own small products are left out); DPO adds a forward pass of the reference
model (4 passes). Recomputation by gradient checkpointing is not model FLOPs, so it lowers MFU.

Work a run does not need is not model FLOPs either: the output head counts only for tokens whose next token
is a label (``head_share``: SFT replies, DPO completions; about 1 in pretraining), and a DPO prompt that the
chosen and rejected rows share counts once (``body_share``: computed tokens per real token, below 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Union

TRAIN_PASSES = 3  # forward + backward (2 forwards' worth) per trained token
DPO_PASSES = 4  # policy forward + backward, and the reference model's forward


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that decide its FLOPs."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], Any]) -> "ModelShape":
        """From a transformers config object or a config.json dict (llama, qwen2, glm and alike)."""
        get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(hidden_size=hidden, num_layers=int(get("num_hidden_layers")), num_heads=heads,
                   num_kv_heads=int(get("num_key_value_heads") or heads),
                   head_dim=int(get("head_dim") or hidden // heads),
                   intermediate_size=int(get("intermediate_size")), vocab_size=int(get("vocab_size")))

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matrix product per token (``N``): every layer's projections + the head."""
        d, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = d * q + 2 * d * kv + q * d  # q, k, v (grouped-query: kv heads only), o
        mlp = 3 * d * self.intermediate_size  # gate and up (fused in GLM as one 2*I-wide product) and down
        return self.num_layers * (attention + mlp) + d * self.vocab_size  # + output head

    @property
    def head_params(self) -> int:
        """Weights of the output head (part of :attr:`matmul_params`)."""
        return self.hidden_size * self.vocab_size

    def forward_flops_per_token(self, context: float, head_share: float = 1.0, body_share: float = 1.0) -> float:
        """Forward FLOPs of one token attending over ``context`` tokens (a multiply-add is 2 FLOPs); the layers
        count ``body_share`` of the time and the output head ``head_share`` of the time (see the module doc)."""
        attention = 4 * self.num_layers * self.num_heads * self.head_dim * context  # QK^T and AV, 2 each
        body = self.matmul_params - self.head_params
        return body_share * (2 * body + attention) + head_share * 2 * self.head_params

    def flops_per_token(self, context: float, passes: int = TRAIN_PASSES, head_share: float = 1.0,
                        body_share: float = 1.0) -> float:
        """FLOPs per token of ``passes`` forward-equivalents: 3 for training (6N + 12 L H d_head T), 4 for DPO."""
        return passes * self.forward_flops_per_token(context, head_share, body_share)


def matmul_peak_flops(dtype: str = "auto", size: int = 0, repeats: int = 5, device: str = "auto") -> dict:
    """The best FLOP/s of a square matrix product on this machine, the roof MFU is measured against.

    ``auto``: float32 on the CPU (with torch's current thread count, as training uses), bfloat16 on a CUDA
    GPU; ``size`` 0 means 2048 on a CPU and 8192 on a GPU. Returns ``{flops_per_second, dtype, size, device,
    threads}``; the best of ``repeats`` timed products after one warm-up.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    size = size or (8192 if device == "cuda" else 2048)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device=device, dtype=getattr(torch, dtype))
            for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=a.dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    best = float("inf")
    for attempt in range(repeats + 1):
        sync()
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync()
        if attempt:  # the first product warms up the kernels and caches
            best = min(best, time.perf_counter() - start)
    return {"flops_per_second": 2 * size ** 3 / best, "dtype": dtype, "size": size, "device": device,
            "threads": torch.get_num_threads()}
