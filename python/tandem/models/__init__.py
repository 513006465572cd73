"""Reference models built from tandem.nn."""

from tandem.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
