"""The benchmark scripts' reports say what their numbers show: the wording follows the numbers
(synthetic results, no measurement)."""
import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name):
    sys.path.insert(0, str(SCRIPTS))  # bench_conv imports compare_methods as a sibling
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def _cnn_results(losses: dict[str, list[float]], jacobian_share: float) -> dict:
    ratios = ["0.5", "0.9"]
    methods = []
    for label, values in losses.items():
        stats = None if label in ("magnitude", "random") else 10.0
        methods.append({"label": label, "conv_statistics": "positions" if "positions" in label else "exact",
                        "statistics_seconds": stats, "jacobian_seconds": stats and jacobian_share * stats,
                        "ratios": {r: {"loss": v, "accuracy": 0.9} for r, v in zip(ratios, values, strict=True)}})
    return {"methods": methods, "load_start": 1.0, "load_end": 2.0, "cpus": 2,
            "exact_vs_positions": {"layers": {"conv1": {"score_relative_difference": 0.5}},
                                   "pruned_per_layer": {"0.5": {"exact": {"conv1": 10}, "positions": {"conv1": 12}}}}}


def test_bench_conv_reading_follows_the_numbers():
    bench_conv = _script("bench_conv")
    losses = {"ecp (exact Conv statistics)": [0.1, 1.0], "ecp (positions approximation)": [0.2, 0.9],
              "ecp exact, no compensation": [0.3, 0.5], "variance (mean compensation)": [0.05, 2.0],
              "magnitude": [0.4, 1.5], "random": [2.0, 2.3], bench_conv.DIAGNOSTIC: [0.2, 0.4]}
    text = bench_conv.reading(_cnn_results(losses, 0.7), [0.5, 0.9])
    assert "compensating only the Conv layers gives a lower test loss at r = 0.5, 0.9" in text
    assert "compensating every layer at r = 0.5." in text
    assert "At r = 0.9 the Conv-only compensation beats" in text
    assert "higher test loss than ECP (exact) at r = 0.9;" in text
    assert "below the exact statistics' at r = 0.9 " in text and "70% of the exact statistics time (the larger" in text
    losses[bench_conv.DIAGNOSTIC] = [0.5, 1.2]  # Conv-only compensation never better: no such claim
    text = bench_conv.reading(_cnn_results(losses, 0.3), [0.5, 0.9])
    assert "Conv-only compensation beats" not in text and "gives a lower test loss at r = none" in text
    assert "(the smaller part)" in text


def test_bench_ensemble_says_when_the_loop_wins():
    bench_ensemble = _script("bench_ensemble")

    def row(loop_over_batched):
        return {"kind": "perceptron", "N": 10, "batch": 1, "threads": 1, "batched_s": 1.0, "loop_s": loop_over_batched,
                "branches_s": 1.0, "numpy_s": 1.0, "loop_over_batched": loop_over_batched,
                "branches_over_batched": 1.0, "agree_with_estimator": {"batched": 1, "branches": 1, "loop": 0}}

    case = {"kind": "perceptron", "hidden": [], "N": 10, "threads": 1, "rows": [row(3.0), row(0.5)],
            "setup_seconds": {"batched": 0.1, "loop": 0.1, "branches": 0.1}}
    text = bench_ensemble.markdown({"cases": [case], "command": "x", "machine": "m", "onnxruntime": "1",
                                    "load_before": [1], "load_after": [1]})
    assert "In 1 of 2 cases it is not faster than the loop." in text
    assert "labels in 0 of 2 cases" in text and "every case measured" not in text

