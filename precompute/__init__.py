"""longred.precompute"""
