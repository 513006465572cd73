"""The `tandem` command: train, prepare-data, generate, bench, plan, info (also `python -m tandem`)."""

import argparse
import os
import sys

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit code 2 (`--help` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from tandem.cli import bench, generate, info, plan, prepare_data, train

    p = _Parser(prog="tandem", description="Tensor x pipeline x data parallel training "
                                "and inference of transformer models.")
    sub = p.add_subparsers(dest="command", required=True)
    for mod in (train, prepare_data, generate, bench, plan, info):
        mod.add_parser(sub)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # to relaunch the same command on several processes
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # `tandem info | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
