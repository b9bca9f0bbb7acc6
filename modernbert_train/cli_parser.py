"""The command lines' argument parser: argparse, but a usage error is one line naming the problem."""

import argparse

EXIT_USAGE = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line naming the problem (no usage dump above it)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")
