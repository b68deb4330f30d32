"""longred.eval: short-text retention, long-text perplexity, passkey retrieval and drift against the teacher.

`run_eval` (the `longred eval` command) loads everything and writes a report; `evaluate_model` measures
one already-loaded model on shared inputs (`load_short_texts`, long-text windows, `make_passkey_cases`),
and `write_report` writes the tables and plots of one or several models side by side.
"""

from longred.eval.drift import evaluate_drift
from longred.eval.evaluate import HEADLINE_KEYS, evaluate_model
from longred.eval.long_text import bucket_edges, evaluate_long_text
from longred.eval.passkey import PasskeyCase, evaluate_passkey, make_passkey_cases
from longred.eval.report import render_markdown, write_report
from longred.eval.run import EvalConfig, run_eval
from longred.eval.short_text import (
    KL_DIRECTION,
    ShortTexts,
    evaluate_short_text,
    full_distribution_sums,
    load_short_texts,
    short_texts_from_corpus,
)

__all__ = [
    "HEADLINE_KEYS",
    "KL_DIRECTION",
    "EvalConfig",
    "PasskeyCase",
    "ShortTexts",
    "bucket_edges",
    "evaluate_drift",
    "evaluate_long_text",
    "evaluate_model",
    "evaluate_passkey",
    "evaluate_short_text",
    "full_distribution_sums",
    "load_short_texts",
    "make_passkey_cases",
    "render_markdown",
    "run_eval",
    "short_texts_from_corpus",
    "write_report",
]
