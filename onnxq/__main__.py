"""`python -m onnxq` is the same as the `onnxq` command."""

from onnxq.cli import main

main()
