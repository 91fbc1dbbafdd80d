"""deepspeed -> shardwise: the ``compat/deepspeed`` distribution (``pip install ./compat/deepspeed``).

Importing this package installs shardwise's alias and replaces this module in ``sys.modules`` with ``shardwise``,
so ``import deepspeed.X`` is ``shardwise.X`` (one module object per name). ``shardwise-report`` / ``ds_report``
say which implementation ``import deepspeed`` gives."""

from shardwise import alias as _alias

_alias.install()  # replaces this module in sys.modules with shardwise
