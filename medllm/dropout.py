"""LoRA dropout that is fast on a CPU.

torch draws a dropout mask with ``bernoulli_``, one Mersenne Twister draw per element, and multiplies by it as a float
tensor, which on a CPU costs more than the matrix product the dropped input feeds ([1024, 704] float32 on this
project's benchmark machine: 3.3 ms forward and backward). :class:`CpuDropout` cuts one 64-bit random number into
four 16-bit ones and drops an element when its number falls in the lowest ``round(p * 2**16)`` of the 2**16 values:
the probability is ``p`` to within 2**-17 (0.05 becomes 0.0500031), and kept elements are scaled by the inverse of
the exact keep probability, so the expectation is unchanged. The mask stays boolean (``torch.where``; a
multiplication by a boolean tensor takes torch's slow mixed-type path), a quarter of a float mask's memory. LoRA PT
on ``small``, paired steps on the same batches: 6.5% faster than the 31-bit draws of the version before, which were
5-8% faster than ``nn.Dropout`` (benchmarks/README.md). Elsewhere (a GPU, eval mode, ``p`` within 2**-17 of 0 or 1)
it is ``nn.Dropout``. It draws from torch's generator, so ``torch.manual_seed`` repeats it.
"""

from __future__ import annotations

import torch

RANDOM_BITS = 16  # per element: a quarter of one 64-bit draw


class CpuDropout(torch.nn.Dropout):
    """``nn.Dropout`` with a mask drawn four elements per random number on a CPU (see the module docstring)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        threshold = round(self.p * 2 ** RANDOM_BITS)  # drawn numbers below it, of 2**16, are dropped
        if (not self.training or not 0 < threshold < 2 ** RANDOM_BITS or inputs.device.type != "cpu"
                or not inputs.is_floating_point()):
            return super().forward(inputs)
        count = inputs.numel()
        draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits uniform
        numbers = draws.view(torch.int16)[:count].view_as(inputs)  # uniform on [-2**15, 2**15)
        keep = numbers >= threshold - 2 ** (RANDOM_BITS - 1)
        return torch.where(keep, inputs, 0.0).mul_(2 ** RANDOM_BITS / (2 ** RANDOM_BITS - threshold))


def use_cpu_dropout(model, kind: type = CpuDropout) -> int:
    """Make the dropout of every LoRA layer in ``model`` a ``kind`` of the same ``p`` (a :class:`CpuDropout`;
    ``nn.Dropout`` switches back); returns how many LoRA dropouts are of that kind now."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) in (torch.nn.Dropout, CpuDropout):
                if type(dropout) is not kind:
                    dropouts[name] = kind(dropout.p, inplace=dropout.inplace).train(dropout.training)
                count += 1
    return count
