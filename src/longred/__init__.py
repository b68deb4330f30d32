"""longred: LongReD context-window extension with an offline teacher cache."""

from longred.base.version import __version__

__all__ = ["__version__"]
