"""Model conventions every stage shares: model inputs, layer hooks, target capture, losses, drift."""
