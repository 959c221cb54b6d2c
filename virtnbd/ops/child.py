"""One domain of a many-domain run, in its own process.

argv: RESULT_FILE DOMAIN (the domain only shows in ps); stdin: the pickled
one-domain FleetOptions written by the parent (virtnbd.ops.fleet). The
summary or the error message goes to RESULT_FILE as JSON; the exit code is
the usual one (0, 1, 2 with --strict, 128+N on a signal).
"""
from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Sequence

from virtnbd import errors
from virtnbd.cli.shell import run_main
from virtnbd.ops import fleet
from virtnbd.ops.options import FleetOptions


def main(argv: Sequence[str]) -> int:
    result_file, domain = argv[0], argv[1]
    options = pickle.load(sys.stdin.buffer)
    if not isinstance(options, FleetOptions):
        raise TypeError("virtnbd.ops.child reads the options its parent writes")

    def run(opts: FleetOptions) -> None:
        try:
            summary = fleet.run_one(opts.backup)
        except errors.VirtnbdError as err:
            _write(result_file, {"error": str(err)})
            raise
        _write(result_file, {"summary": summary})

    return run_main(f"virtnbdbackup[{domain}]", [], lambda _argv: options, run)


def _write(path: str, data: dict[str, object]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
