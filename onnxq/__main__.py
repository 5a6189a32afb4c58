"""`python -m onnxq` is the same as the `onnxq` command."""

from onnxq._launch import main

main()
