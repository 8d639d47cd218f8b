"""``python -m onnxprune.cli``: the same as the ``onnxprune`` command."""
from . import main

main()
