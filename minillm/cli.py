"""What the command lines share: an argument parser whose errors are one line."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage error prints one line (not the usage block) and exits with 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
