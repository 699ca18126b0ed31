"""`vtc` with the test components registered: what a user's own component module would do
(`import my_components` before `train.cli.main`). Lightning's DDP launcher re-runs this file
in each process."""

import sys

import tests.components  # noqa: F401  (registers the test components)
from train.cli import main

if __name__ == "__main__":
    sys.exit(main())
