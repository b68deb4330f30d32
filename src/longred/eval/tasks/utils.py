"""Per-document results of the longred_heldout_ppl task (lm-eval's wikitext convention)."""

import re


def perplexity_results(doc, results):
    """(log-likelihood, units) pairs that lm-eval's weighted perplexity and bits-per-byte aggregate."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    data = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, data),
        "bits_per_byte": (loglikelihood, data),
    }
