"""Gibbs-weighted ensembles of random classifiers, exported as one ONNX graph.

Pipeline: draw members (members.py) -> energies -> Gibbs weights and temperature (gibbs.py,
estimator.py) -> one batched ONNX graph (export.py) -> validate on onnxruntime. The click group
``ensemble`` (cli.py) is registered by the main CLI.
"""
from onnxprune_gibbs.checks import compare_predictions
from onnxprune_gibbs.estimator import GibbsEnsemble
from onnxprune_gibbs.export import run_onnx, to_onnx
from onnxprune_gibbs.gibbs import effective_size, gibbs_weights, log_gibbs_weights, std_temperature
from onnxprune_gibbs.members import MemberBank, draw_members

__all__ = ["GibbsEnsemble", "MemberBank", "compare_predictions", "draw_members", "effective_size",
           "gibbs_weights", "log_gibbs_weights", "run_onnx", "std_temperature", "to_onnx"]
