"""The package version, in a module of its own so that any layer can read it without importing
the package's public API (``infercomp/__init__.py`` imports the verbs, which import everything)."""

__version__ = "0.2.0"
