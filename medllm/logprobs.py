"""The LM head's losses on a CPU: the cross-entropy of PT and SFT, and DPO's per-token log-probabilities.

PT and SFT: :func:`use_fast_cpu_loss` gives a model :func:`causal_lm_loss`, transformers' ``ForCausalLMLoss`` with
the cross-entropy of :class:`CpuCrossEntropy` where the logits are float32 on a CPU. torch's ``cross_entropy``
writes the log-softmax of every logit, then in the backward pass a one-hot gradient and the
log-softmax's gradient: three fresh tensors the size of the logits ([2048, 7333] floats, 60 MB, in a ``small`` PT
step), each paid for in page faults as well as passes. :class:`CpuCrossEntropy` keeps one log-sum-exp per token and
turns the logits into their own gradient in place, chunk by chunk: on the benchmark machine it adds a few ms to the
head's matrix products where transformers' loss adds 80-90, and ``small`` PT steps are 4.6% faster
(benchmarks/README.md).

DPO: trl scores DPO's tokens through ``ChunkedLogProbFunction``: tiles of the head's projection folded into online
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


CHUNK_ELEMENTS = 1 << 19  # logits per chunk of CpuCrossEntropy's passes (2 MB of float32: they stay in cache)


class CpuCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of ``logits`` ``[tokens, vocab]`` against ``targets`` (``ignore_index`` skipped),
    divided by ``denominator``; float32 on a CPU.

    The backward pass writes the gradient over the logits themselves (softmax minus one-hot, times the loss's
    gradient), so ``logits`` hold that gradient after it: :func:`causal_lm_loss` passes the model's own head output,
    which nothing reads after the loss. Had another op saved them for its own backward pass, autograd would raise
    its in-place error there rather than use the overwritten values. Leaf logits (a tensor a caller made, not an op's
    output) are copied first, so a caller's own tensor is never overwritten.
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, denominator):
        owner = logits if logits._base is None else logits._base  # the tensor whose memory the logits are
        if ctx.needs_input_grad[0] and owner.grad_fn is None:  # a caller's leaf tensor: overwrite a copy
            logits = logits.clone()
        log_z = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
        rows = max(1, CHUNK_ELEMENTS // logits.shape[1])
        for start in range(0, logits.shape[0], rows):
            torch.logsumexp(logits[start:start + rows], dim=-1, out=log_z[start:start + rows])
        labelled = targets.ne(ignore_index)
        targets = targets.masked_fill(~labelled, 0)
        per_token = (log_z - logits.gather(-1, targets[:, None])[:, 0]).masked_fill_(~labelled, 0)
        ctx.save_for_backward(logits, log_z, targets, labelled)
        ctx.denominator, ctx.rows = denominator, rows
        return per_token.sum() / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        logits, log_z, targets, labelled = ctx.saved_tensors
        row_scale = torch.where(labelled, grad_loss / ctx.denominator, 0.0)  # 0 where the label is ignored
        rows = ctx.rows
        for start in range(0, logits.shape[0], rows):  # d loss / dz_j = (p_j - [j = target]) * row_scale
            end = start + rows
            logits[start:end].sub_(log_z[start:end, None]).exp_().mul_(row_scale[start:end, None])
        every_row = torch.arange(logits.shape[0], device=logits.device)
        logits.index_put_((every_row, targets), -row_scale, accumulate=True)
        return logits, None, None, None


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, **kwargs):
    """transformers' ``ForCausalLMLoss`` (same arguments, same loss), with :class:`CpuCrossEntropy` where the
    logits are float32 on a CPU: their backward pass overwrites the logits with their gradient (its docstring)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                               ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
    if shift_labels is None:  # position i predicts token i + 1
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:  # transformers' reduction="mean": over the labelled tokens
        denominator = targets.ne(ignore_index).sum()
    else:
        denominator = torch.as_tensor(num_items_in_batch).to(logits.device)
    return CpuCrossEntropy.apply(logits.reshape(-1, vocab_size), targets, ignore_index, denominator)


def use_fast_cpu_loss(model) -> bool:
    """Give ``model`` (a transformers causal LM, or a peft model around one) :func:`causal_lm_loss` where its loss is
    transformers' stock ``ForCausalLMLoss``; returns whether it did (models with their own loss keep it)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from medllm.modeling import unwrap_peft

    base = unwrap_peft(model)
    if getattr(base, "loss_function", None) is not ForCausalLMLoss:
        return False
    base.loss_function = causal_lm_loss
    return True
