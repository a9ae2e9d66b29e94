"""OpenCompass 0.5.4 classes for this project; imported only inside the eval environment (``.venv-eval``).

``configs/`` names these classes by import, so OpenCompass builds them from the dumped config by their dotted
path (``medllm.opencompass_compat.X``); the configs put the repo root on ``sys.path`` and ``PYTHONPATH``.

- :class:`ChatModel`: OpenCompass's ``HuggingFacewithChatTemplate`` for transformers 5 (restores the removed
  ``tokenizer.batch_encode_plus`` it calls), float32 on CPU, no ``trust_remote_code`` unless asked.
- :class:`CMBDataset`: CMB from ``val.json``/``test.json`` like OpenCompass's own, but the test split keeps
  its answers (the stock loader sets them all to ``'NULL'``, so ``cmb_test`` always scores 0).
- :class:`CMBAccEvaluator`: accuracy, or an ``error`` (shown as ``-`` in the summary) when the split's file
  has no answers, instead of a meaningless 0.
"""

from __future__ import annotations

from typing import Optional

from opencompass.datasets.base import BaseDataset
from opencompass.models import HuggingFacewithChatTemplate
from opencompass.openicl.icl_evaluator import AccEvaluator
from opencompass.registry import ICL_EVALUATORS, LOAD_DATASET, MODELS
from opencompass.utils import get_logger

from medllm.cmb import option_str
from medllm.evaluation import read_cmb_split
from medllm.modeling import check_model_folder

logger = get_logger()  # OpenCompass's own logger, so these lines show with its output

NO_ANSWER = "NULL"  # what OpenCompass's CMBDataset writes for a missing answer; never a real one (letters)
DTYPES = ("float32", "float16", "bfloat16", "auto")


@MODELS.register_module()
class ChatModel(HuggingFacewithChatTemplate):
    """``HuggingFacewithChatTemplate`` that works with transformers 5 and on CPU.

    ``model_kwargs['dtype']`` (or ``torch_dtype``): float32 | float16 | bfloat16 | auto; default float32 on
    CPU and ``auto`` (as saved) on CUDA. ``trust_remote_code`` is False unless the config sets it.
    """

    def __init__(self, path: str, **kwargs):
        check_model_folder(path)  # a clear message instead of a hub lookup of a missing folder
        super().__init__(path, **kwargs)

    def _load_tokenizer(self, path: Optional[str], kwargs: dict, pad_token_id: Optional[int] = None):
        kwargs = {"trust_remote_code": False, **kwargs}
        super()._load_tokenizer(path, kwargs, pad_token_id)
        if not hasattr(self.tokenizer, "batch_encode_plus"):
            # transformers 5 removed it; calling the tokenizer on a list of strings does the same.
            self.tokenizer.batch_encode_plus = self.tokenizer.__call__

    def _load_model(self, path: str, kwargs: dict, peft_path: Optional[str] = None, peft_kwargs: dict = dict()):
        import torch
        from transformers import AutoModelForCausalLM

        kwargs = dict(kwargs)
        on_cuda = torch.cuda.is_available()
        dtype, legacy_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        dtype = dtype or legacy_dtype or ("auto" if on_cuda else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"model_kwargs dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
        kwargs.setdefault("trust_remote_code", False)
        if on_cuda:
            kwargs.setdefault("device_map", "auto")
        self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if peft_path is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, peft_path, is_trainable=False, **peft_kwargs)
        self.model.eval()
        self.model.generation_config.do_sample = False
        self.logger.info(f"loaded {path} ({self.model.dtype}, {self.model.device})")


@LOAD_DATASET.register_module()
class CMBDataset(BaseDataset):
    """CMB (Chinese Medical Benchmark) val and test splits, both with their answers when the files have them."""

    @staticmethod
    def load(path: str):
        """``path``: a folder with val.json and test.json (absolute, or relative to the current folder)."""
        from datasets import Dataset, DatasetDict

        splits = {}
        for split in ("val", "test"):
            items, unanswered = read_cmb_split(path, split)
            for item in items:
                item["option_str"] = option_str(item["option"])
                item["answer"] = item.get("answer") or NO_ANSWER
            if unanswered:
                logger.warning(f"CMB data: {path}/{split}.json: {unanswered} of {len(items)} questions have no "
                               f"answer; this split is not scored (shown as '-').")
            splits[split] = Dataset.from_list(items)
        return DatasetDict(splits)


@ICL_EVALUATORS.register_module()
class CMBAccEvaluator(AccEvaluator):
    """Accuracy in percent; an ``error`` result instead of a score when any reference answer is missing."""

    def score(self, predictions: list, references: list, test_set=None) -> dict:
        missing = sum(1 for reference in references if reference in (None, "", NO_ANSWER))
        if missing:
            message = (f"not scored: {missing} of {len(references)} questions have no answer in the data file "
                       f"(the official CMB test answers are not public)")
            logger.warning(f"CMB {message}")
            return {"error": message}
        return super().score(predictions, references)
