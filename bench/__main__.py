"""`python -m pensieve.bench`: the same sweep as `pensieve bench`."""

from __future__ import annotations

import argparse
import sys

from pensieve.bench import sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pensieve.bench",
        description="Replay multi-turn chat traces against pensieve engines and peers.",
    )
    sweep.add_arguments(parser)
    return sweep.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
