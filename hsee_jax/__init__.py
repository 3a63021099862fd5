"""hsee_jax: Hetero-SplitEE (split learning with early exits for heterogeneous
clients; Oda et al., arXiv 2512.09313) in JAX/Flax."""
from hsee_jax.config import Config, ConfigError

__all__ = ["Config", "ConfigError"]
__version__ = "0.1.0"
