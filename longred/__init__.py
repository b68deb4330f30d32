"""longred: LongReD context-window extension with an offline teacher cache."""

__version__ = "0.1.0"
