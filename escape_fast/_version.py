"""The package version, read by pyproject.toml and escape_fast.__version__ (one place)."""

__version__ = "0.1.0"
