"""``python -m train <command> ...``: see ``train/cli.py``."""
import sys

from train.cli import main

sys.exit(main())
