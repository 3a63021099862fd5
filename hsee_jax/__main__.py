from hsee_jax.cli import entry

entry()
