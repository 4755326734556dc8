"""`python -m qwen2_jax` is the same as the `qwen2-jax` console script."""

import sys

from qwen2_jax.cli import main

sys.exit(main())
