"""Sample text from a checkpoint: `python generate.py --help` lists every option."""

import sys

from minillm.generate_cli import main

if __name__ == "__main__":
    sys.exit(main())
