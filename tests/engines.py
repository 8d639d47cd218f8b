"""Which gradient engines this environment has, for tests that need one in particular."""
import pytest

from onnxprune.derivatives.engines.base import training_build

TRAINING = training_build()
requires_training = pytest.mark.skipif(not TRAINING,
                                       reason="needs the onnxruntime training build (pip install -e '.[training,test]')")
AVAILABLE = ["adjoint", "ort-training"] if TRAINING else ["adjoint"]
