"""The chat model(s) to evaluate: OpenCompass's hf_glm4_9b_chat entry, pointed at this pipeline's output.

Environment (all optional; a relative path is taken from the repo root; read by medllm/evaluation.py):
  MODEL_PATH       model folder (default outputs/demo/dpo-merged, the pipeline's final merged model)
  MODEL_ABBR       its name in the summary (default: the folder's name)
  MODEL_PATHS      several models in one run: "abbr1=path1,abbr2=path2" (replaces MODEL_PATH/MODEL_ABBR)
  EVAL_BATCH_SIZE  questions per generate() call (default 16)
  EVAL_DTYPE       float32 | bfloat16 | float16 | auto (default: float32 on CPU, auto = as saved on CUDA)
  EVAL_NUM_GPUS    GPUs each model needs (default 0: CPU; OpenCompass refuses to start with fewer visible)
"""
import os
import sys

from medllm.opencompass_compat import ChatModel

# OpenCompass builds ChatModel from its dotted name, in this process (--debug) and in the task processes
# it starts otherwise: the repo root must be importable in both.
_repo = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
if _repo not in sys.path:
    sys.path.insert(0, _repo)
if _repo not in os.environ.get('PYTHONPATH', '').split(os.pathsep):
    os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (_repo, os.environ.get('PYTHONPATH')) if p)

# mmengine turns a config's `import`s of non-builtin modules into lazy references; __import__ runs this
# one now (medllm.evaluation is stdlib only).
_evaluation = __import__('medllm.evaluation', fromlist=['evaluation'])
_model_kwargs = dict(dtype=os.environ['EVAL_DTYPE']) if os.environ.get('EVAL_DTYPE') else dict()

models = [
    dict(
        type=ChatModel,
        abbr=_abbr,
        path=_path,
        model_kwargs=_model_kwargs,
        # OpenCompass's default chat meta template maps SYSTEM to HUMAN inside each round, so a one-turn prompt
        # reaches the model as "<prompt>\n" (its empty SYSTEM part joined with a newline). This one sends the
        # dataset's HUMAN prompt as is: the CMB prompt the SFT data was written with, byte for byte.
        meta_template=dict(
            round=[dict(role='HUMAN', api_role='HUMAN'), dict(role='BOT', api_role='BOT', generate=True)],
            reserved_roles=[dict(role='SYSTEM', api_role='SYSTEM')],
        ),
        max_out_len=10,  # CMB answers are letters; the dataset config sets the same
        batch_size=int(os.environ.get('EVAL_BATCH_SIZE') or 16),
        run_cfg=dict(num_gpus=int(os.environ.get('EVAL_NUM_GPUS') or 0)),
    )
    for _abbr, _path in _evaluation.models_from_env()
]
del _evaluation, _model_kwargs, _repo
