"""Reference models used by the demo, the examples, the benchmarks and the tests."""

from shardwise.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
