"""Evaluation of a trained policy (`flaxalign eval --config=configs/eval.py:tiny --checkpoint=RUN`).

* `text_metrics`: pure functions over text — distinct-n, repeated n-gram rate, self-BLEU, refusal rate (the pattern
  list `REFUSAL_PATTERNS`), exact match, win rate, length statistics;
* `likelihood`: scoring given text by the model's log-likelihood — perplexity of text files, multiple-choice
  accuracy (acc / acc_norm);
* `evaluation`: `evaluate(config, checkpoint)` runs the parts a config asks for and writes `eval.json`.
"""

from flaxalign.eval.evaluation import evaluate

__all__ = ["evaluate"]
