"""medllm: the shared package behind the stage scripts (PT, SFT, DPO, merge, inference).

Modules: ``arguments`` (every flag, defined once), ``data`` (loaders and validation),
``templates`` (chat templates), ``modeling`` (model/tokenizer loading), ``training``
(trainer helpers), ``generation`` (chat and batch generation), ``tiny`` (the offline default model).
Heavy libraries are imported inside functions so that ``--help`` stays fast.
"""

__version__ = "0.1.0"
