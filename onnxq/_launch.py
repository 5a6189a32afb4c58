"""The `onnxq` console script. It imports nothing but the standard library before the CLI, so Ctrl-C while
the CLI's own imports load is one line and exit 130, not a traceback."""

from __future__ import annotations

import os
import sys


def main() -> None:
    try:
        from onnxq.cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr, flush=True)
        os._exit(130)  # nothing was started that needs cleaning up; skip an interpreter teardown mid-import
    cli_main()
