"""longred.eval: short-text retention, long-text perplexity, passkey retrieval and drift against the teacher."""
