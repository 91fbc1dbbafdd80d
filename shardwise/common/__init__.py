"""Leaf helpers every shardwise package may import: the logger (``logging.py``) and progress reporting
(``progress.py``). They import nothing of shardwise beyond this package, so ``checkpoint/``, ``sp/``, ``tp/`` and
``utils/`` (whose DeepSpeed facades import ``checkpoint`` and ``sp``) can all use them without a package cycle.
DeepSpeed's paths ``deepspeed.utils.logging`` and ``shardwise.common.progress`` stay as re-exports."""
