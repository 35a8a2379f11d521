"""ssmjax: scans and state spaces in JAX."""

__version__ = "0.1.0"
