"""CMB (Chinese Medical Benchmark) prompt rendering and scoring, as OpenCompass does it.

Stdlib only, so it can be imported by the data generator and by light tests.

OpenCompass's ``CMBDataset.load`` adds an ``option_str`` column to every item::

    option_str = "\\n".join(f"{k}. {v}" for k, v in item["option"].items() if len(v) > 1)

(options whose text is one character or shorter -- e.g. the empty ``"E": ""`` of
4-option questions -- are dropped), and the ``cmb_gen`` config's single HUMAN turn is::

    以下是中国{exam_type}中{exam_class}考试的一道{question_type}，不需要做任何分析和解释，直接输出答案选项。
    {question}
    {option_str} \\n 答案: 

i.e. there is a space before the last newline and a space on each side of ``答案:``.
The model's reply is post-processed with OpenCompass's ``multiple_select_postprocess``
(the set of upper-case characters in the reply, sorted and joined) and compared with the
``answer`` field (e.g. ``"C"`` or ``"ABD"``) by exact string match (``AccEvaluator``).
So a reply like ``"C. ACE抑制剂"`` becomes ``"ACE"`` and is scored wrong: models must
answer with the bare letter(s).

Note: recent OpenCompass versions overwrite ``answer`` with ``"NULL"`` for the *test*
split when loading CMB (the official CMB test answers are hidden); only ``val`` is
scored against real answers there.
"""

from __future__ import annotations

CMB_PROMPT_TEMPLATE = (
    "以下是中国{exam_type}中{exam_class}考试的一道{question_type}，"
    "不需要做任何分析和解释，直接输出答案选项。\n{question}\n{option_str} \n 答案: "
)


def option_str(option: dict) -> str:
    """Render options as OpenCompass does: ``"A. xx\\nB. yy"``, skipping texts of length <= 1."""
    return "\n".join(f"{k}. {v}" for k, v in option.items() if len(v) > 1)


def render_cmb_prompt(item: dict) -> str:
    """Return the exact user prompt OpenCompass's ``cmb_gen`` config sends for ``item``."""
    return CMB_PROMPT_TEMPLATE.format(
        exam_type=item["exam_type"],
        exam_class=item["exam_class"],
        question_type=item["question_type"],
        question=item["question"],
        option_str=option_str(item["option"]),
    )


def multiple_select_postprocess(text: str) -> str:
    """OpenCompass ``multiple-select`` post-processor: sorted set of upper-case characters."""
    return "".join(sorted({t for t in text if t.isupper()}))


def score_answer(prediction: str, answer: str) -> bool:
    """True iff OpenCompass would count ``prediction`` as correct for ``answer``."""
    return multiple_select_postprocess(prediction) == answer
