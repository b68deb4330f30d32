"""The corpus layer: documents in a fixed order, the embedded stdlib texts, fixed-length windows."""
