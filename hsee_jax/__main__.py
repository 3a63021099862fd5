import sys

from hsee_jax.cli import main

sys.exit(main())
