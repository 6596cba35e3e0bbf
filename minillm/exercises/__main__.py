"""python -m minillm.exercises: list, start NAME, check NAME, hint NAME [K] (see minillm/exercises/__init__.py)."""

import sys

from minillm.exercises.commands import main

if __name__ == "__main__":
    sys.exit(main())
