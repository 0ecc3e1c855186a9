"""`python -m experiments.export`: the command `resnet_jax.cli.export` (installed as a console script,
see resnet_jax/cli/__init__.py), run from a checkout."""

import sys

from resnet_jax.cli.export import *  # noqa: F401,F403  its functions, for scripts written against this module
from resnet_jax.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
