"""CMB (Chinese Medical Benchmark), generation: OpenCompass's cmb_gen_dfb5c4 for this project.

Two datasets: `cmb` (val.json) and `cmb_test` (test.json) from CMB_DATA_DIR (default: <repo>/data/cmb; a
relative path is taken from the repo root). Unlike OpenCompass's own CMBDataset, the test split keeps its
answers, so `cmb_test` is scored when test.json has them and shown as '-' (with a warning) when it does not.
The prompt is medllm.cmb.CMB_PROMPT_TEMPLATE (tests/test_eval.py checks that they are equal).
"""
import os
import sys

from opencompass.openicl.icl_inferencer import GenInferencer
from opencompass.openicl.icl_prompt_template import PromptTemplate
from opencompass.openicl.icl_retriever import ZeroRetriever
from opencompass.utils.text_postprocessors import multiple_select_postprocess

from medllm.opencompass_compat import CMBAccEvaluator, CMBDataset

# OpenCompass builds the classes above from their dotted names, in this process (--debug) and in the task
# processes it starts otherwise: the repo root must be importable in both.
_repo = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
if _repo not in sys.path:
    sys.path.insert(0, _repo)
if _repo not in os.environ.get('PYTHONPATH', '').split(os.pathsep):
    os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (_repo, os.environ.get('PYTHONPATH')) if p)

# mmengine turns a config's `import`s of non-builtin modules into lazy references; __import__ runs this
# one now (medllm.evaluation is stdlib only).
_data_dir = __import__('medllm.evaluation', fromlist=['evaluation']).data_dir_from_env()

cmb_datasets = []
for _split in ['val', 'test']:
    cmb_datasets.append(
        dict(
            abbr='cmb' if _split == 'val' else 'cmb_test',
            type=CMBDataset,
            path=_data_dir,  # absolute: a relative one would be taken from the current folder (the work dir)
            reader_cfg=dict(
                input_columns=['exam_type', 'exam_class', 'question_type', 'question', 'option_str'],
                output_column='answer',
                train_split=_split,
                test_split=_split,
            ),
            infer_cfg=dict(
                prompt_template=dict(
                    type=PromptTemplate,
                    template=dict(
                        round=[
                            dict(
                                role='HUMAN',
                                prompt='以下是中国{exam_type}中{exam_class}考试的一道{question_type}，'
                                '不需要做任何分析和解释，直接输出答案选项。\n{question}\n{option_str} \n 答案: ',
                            ),
                            dict(role='BOT', prompt='{answer}'),
                        ],
                    ),
                ),
                retriever=dict(type=ZeroRetriever),
                # The answer is one to five letters; 10 tokens leave room for a separator or two.
                inferencer=dict(type=GenInferencer, max_out_len=10),
            ),
            eval_cfg=dict(
                evaluator=dict(type=CMBAccEvaluator),
                # Keeps every upper-case letter of the reply: "C" -> "C", "AD" -> "AD", "C. ACE抑制剂" -> "ACE".
                pred_postprocessor=dict(type=multiple_select_postprocess),
            ),
        )
    )
del _split, _data_dir, _repo
