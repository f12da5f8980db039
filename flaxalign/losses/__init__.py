"""Algorithm math as small pure functions (equations in the docstrings)."""

from flaxalign.losses.lm import chunked_token_logps, sequence_logps, token_cross_entropy

__all__ = ["chunked_token_logps", "sequence_logps", "token_cross_entropy"]
