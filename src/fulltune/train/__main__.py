"""`python -m fulltune.train`: the entry point of every training rank (see recipe.py)."""

import sys

from fulltune.train.recipe import main

sys.exit(main())
