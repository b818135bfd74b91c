"""lumiere_jax: Lumiere (a space-time diffusion model for video) in JAX/Flax."""

__version__ = "0.1.0"
