"""The ``shardwise`` / ``deepspeed`` launcher: start ranks on one or many nodes. Imports no runtime code.

``cli`` is the console script, ``launch`` the per-node process (``python -m shardwise.launcher.launch``),
``hostfile`` the pure hostfile/filter logic, ``runners`` the multi-node command builders. Nothing here is
imported by ``import shardwise``; the submodules are loaded on use.
"""
