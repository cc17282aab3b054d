"""tas_jax: network pruning by Transformable Architecture Search, in JAX."""

__version__ = "0.1.0"
