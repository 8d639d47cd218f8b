import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _training_build() -> bool:
    from onnxprune.runtime import RuntimeUnavailable, training_modules

    try:
        training_modules()
    except RuntimeUnavailable:
        return False
    return True


# Tests of the onnxruntime-training engine: skipped where the installed onnxruntime is not the training build.
requires_training = pytest.mark.skipif(not _training_build(), reason="needs the onnxruntime-training build (pip install '.[training]')")
