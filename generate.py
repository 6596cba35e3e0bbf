"""Sample text from a checkpoint: `python generate.py --help` lists every option."""

import sys

if __name__ == "__main__":
    try:
        from minillm.generate_cli import main

        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while Python is still importing, before main() handles it
        sys.exit(130)
