"""The package version, in the bottom layer so that run records and index manifests can cite it without importing
the public API (``vlprompt/__init__.py`` re-exports it as ``vlprompt.__version__``)."""

__version__ = "0.1.0"
