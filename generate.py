"""Sample text from a checkpoint: `python generate.py --help` lists every option."""

import sys

from minillm.sampling import main

if __name__ == "__main__":
    sys.exit(main())
