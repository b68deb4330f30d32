"""Models: folders and loading, content identity (fingerprints), the embedded teacher, tiny test models."""
