"""Evaluate this pipeline's chat model on CMB (val: `cmb`, test: `cmb_test`) with OpenCompass.

    cd <work dir> && opencompass /abs/path/configs/eval_chat_demo.py -w outputs/eval --debug
    # or from an OpenCompass source checkout: python run.py /abs/path/configs/eval_chat_demo.py -w ... --debug
    # or simply: ./run_eval.sh (creates .venv-eval, sets the offline variables, runs from the work dir)

Which model(s) and data: see configs/models/chatglm/hf_glm4_9b_chat.py and configs/datasets/cmb/.
"""
from mmengine.config import read_base

with read_base():
    from .datasets.cmb.cmb_gen_dfb5c4 import cmb_datasets
    from .models.chatglm.hf_glm4_9b_chat import models

datasets = [*cmb_datasets]
