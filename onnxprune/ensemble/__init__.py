"""Gibbs-weighted ensembles of random classifiers, exported as one ONNX graph.

Pipeline: draw members (members.py) -> energies -> Gibbs weights and temperature (gibbs.py,
estimator.py) -> one batched ONNX graph (export.py) -> validate on onnxruntime. The click group
``ensemble`` (cli.py) is registered by the main CLI.
"""
from .estimator import GibbsEnsemble, compare_predictions
from .export import run_onnx, to_onnx
from .gibbs import effective_size, gibbs_weights, log_gibbs_weights, std_temperature
from .members import MemberBank, draw_members

__all__ = ["GibbsEnsemble", "MemberBank", "compare_predictions", "draw_members", "effective_size",
           "gibbs_weights", "log_gibbs_weights", "run_onnx", "std_temperature", "to_onnx"]
