"""Train a GPT: `python train.py --help` lists every option."""

import sys

from minillm.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
