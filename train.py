"""Train a GPT: `python train.py --help` lists every option."""

import sys

from minillm.training import main

if __name__ == "__main__":
    sys.exit(main())
