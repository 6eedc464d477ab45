import sys

from hyperlora_jax.cli import main

sys.exit(main())
