"""The package version, read by the build (pyproject) and written into every cache."""

__version__ = "0.1.0"
