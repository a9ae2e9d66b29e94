"""The LM head of DPO on a CPU: per-token log-probabilities of the reply tokens, without trl's Triton emulation.

trl scores DPO's tokens through ``ChunkedLogProbFunction``: tiles of the head's projection folded into online
log-sum-exp statistics by a Triton kernel on CUDA/XPU. Elsewhere the kernel is emulated in torch, a dozen passes over
each tile (the optional outputs, the scaling, the online rescaling), and on a CPU every position is scored, prompt and
padding included. :func:`use_fast_cpu_head` makes trl score only the positions that carry a label on a CPU too, and
run :class:`CpuLogProbs` there: ``torch.log_softmax``'s single-pass kernels over chunks of tokens whose logits stay
under :data:`LOGITS_BUDGET`, kept for the backward pass (or recomputed, for chunks beyond the budget). For the 82
reply tokens of one 4-pair batch of the sample data, on the benchmark machine: ``tiny`` (vocabulary 4,096) 1.8
instead of 2.3 ms a reference pass and 3.4 instead of 6.4 ms a policy pass forward and backward; ``small`` (8,192)
6.3 instead of 7.0 and 11.2 instead of 18.1 ms. Outputs equal trl's to float32 rounding. Anything else
(a GPU, half precision or autocast, a final-logit softcap) goes to trl's function.
"""

from __future__ import annotations

import contextlib
import threading

import torch

LOGITS_BUDGET = 1 << 25  # float32 logits (128 MB) a call keeps for its backward pass; beyond it, chunks are recomputed
OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # trl's optional per-token outputs, in its order
_scope = threading.local()  # .log_probs_only: inside log_probs_only()


@contextlib.contextmanager
def log_probs_only():
    """Inside, trl's fused head (once :func:`use_fast_cpu_head` ran) computes the per-token log-probabilities alone:
    for trl's reference passes, which read nothing else, while the policy's head also asks for the metrics'
    entropy, mean logits and top-1."""
    outer = getattr(_scope, "log_probs_only", False)
    _scope.log_probs_only = True
    try:
        yield
    finally:
        _scope.log_probs_only = outer


class CpuLogProbs(torch.autograd.Function):
    """``log p(target)`` per token of ``hidden @ weight.T (+ bias)``, times ``logit_scale / temperature``, with trl's
    optional outputs; the signature and results of trl's ``ChunkedLogProbFunction`` (float32, no softcap)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=("log_probs",) + OUTPUTS):
        ctx.set_materialize_grads(False)
        scale = logit_scale / temperature
        rows = ctx.rows = max(1, LOGITS_BUDGET // weight.shape[0])  # tokens per chunk
        keep = hidden.shape[0] <= rows  # one chunk: its logits are kept for the backward pass
        results = {name: [] for name in ("log_probs", "log_z") + OUTPUTS}
        kept = None
        for start in range(0, hidden.shape[0], rows):
            logits = _logits(hidden[start:start + rows], weight, bias, scale)
            log_probs = torch.log_softmax(logits, dim=-1)
            log_z = logits[:, :1] - log_probs[:, :1]
            chunk_targets = targets[start:start + rows, None]
            results["log_probs"].append(log_probs.gather(-1, chunk_targets)[:, 0])
            results["log_z"].append(log_z[:, 0])
            if "entropy" in outputs:
                results["entropy"].append(-(log_probs.exp() * log_probs).sum(-1))
            if "log_sum_sq_probs" in outputs:
                results["log_sum_sq_probs"].append(torch.logsumexp(2 * log_probs, dim=-1))
            if "mean_logits" in outputs:
                results["mean_logits"].append(logits.mean(-1))
            if "is_top1" in outputs:  # argmax returns the first maximum, as trl counts ties
                results["is_top1"].append(logits.argmax(-1) == chunk_targets[:, 0])
            kept = log_probs if keep else None
        per_token = {name: torch.cat(values) if values else None for name, values in results.items()}
        entropy = per_token["entropy"]
        ctx.save_for_backward(hidden, weight, bias, targets, per_token["log_z"],
                              per_token["log_z"] if entropy is None else entropy, kept)
        ctx.scale = scale
        extras = [per_token[name] for name in OUTPUTS[1:]]
        ctx.mark_non_differentiable(*(x for x in extras if x is not None))
        return (per_token["log_probs"], entropy, *extras)

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy, kept = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.rows):
            end = min(start + ctx.rows, hidden.shape[0])
            chunk = hidden[start:end]
            if kept is not None:
                log_probs = kept
            else:
                log_probs = _logits(chunk, weight, bias, ctx.scale).sub_(log_z[start:end, None])
            probs = log_probs.exp()
            if grad_log_probs is not None:  # d log p_t / dz_j = [j = t] - p_j
                chunk_grad = grad_log_probs[start:end, None]
                grad = (probs * -chunk_grad).scatter_add_(-1, targets[start:end, None], chunk_grad)
            else:
                grad = torch.zeros_like(probs)
            if grad_entropy is not None:  # d entropy / dz_j = -p_j (log p_j + entropy)
                grad.sub_(probs * (log_probs + entropy[start:end, None]) * grad_entropy[start:end, None])
            if ctx.scale != 1:
                grad.mul_(ctx.scale)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), chunk)
            if grad_bias is not None:
                grad_bias.add_(grad.sum(0))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _logits(hidden, weight, bias, scale: float):
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return logits.mul_(scale) if scale != 1 else logits


def use_fast_cpu_head() -> None:
    """Make trl's fused LM head score only the positions that carry a label on a CPU, with :class:`CpuLogProbs`, and
    only the log-probabilities inside :func:`log_probs_only` (any device).

    trl scores only those ("compact") on CUDA/XPU; elsewhere every position, to keep tile shapes fixed for compiling
    backends (Neuron). Nothing is compiled on a CPU: the reply tokens alone give the same losses in half the time.
    """
    import trl.trainer.utils as trl_utils

    chunked = trl_utils._ChunkedLogProbFunction
    if getattr(chunked, "medllm_cpu", False):
        return
    use_triton = trl_utils._use_triton

    class FusedHead:
        """trl's ``ChunkedLogProbFunction``, or :class:`CpuLogProbs` where it applies."""

        medllm_cpu = True

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                  logit_scale=1.0, outputs=("log_probs",) + OUTPUTS):
            if getattr(_scope, "log_probs_only", False):
                outputs = ("log_probs",)
            fast = (hidden.device.type == "cpu" and final_logit_softcapping is None
                    and hidden.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))
            function = CpuLogProbs if fast else chunked
            return function.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                  logit_scale, outputs)

    # Both names are read only by trl.trainer.utils' fused head (trl's kernels keep their own _use_triton).
    trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
    trl_utils._ChunkedLogProbFunction = FusedHead
