"""``python -m onnxprune.cli``: the same as the ``onnxprune`` command."""
from onnxprune.cli import main

main()
