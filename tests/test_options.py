"""Every option of `prune` in both modes (weights, --structured) either acts (an effect this test sees
in the report, the output or the files) or is refused with one line and exit 2 -- never accepted and
ignored. The matrix below is checked to cover every option the command declares."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from test_units import cnn

from onnxprune.cli import main
from onnxprune.cli.prune import prune

from tinynets import mlp

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    path = tmp_path_factory.mktemp("options")
    model, _, _ = mlp((6, 8, 5, 3), activation="tanh", seed=4)
    onnx.save(model, path / "mlp.onnx")
    onnx.save(cnn(), path / "cnn.onnx")
    x = RNG.normal(size=(48, 6)).astype(np.float32)
    np.savez(path / "calib.npz", x=x, y=RNG.integers(0, 3, 48))
    np.savez(path / "test.npz", x=x[:24], y=RNG.integers(0, 3, 24))
    np.savez(path / "other_labels.npz", x=x[:24], target=RNG.integers(0, 3, 24))
    np.savez(path / "images.npz", x=RNG.normal(size=(24, 162)).astype(np.float32))
    return path


def run(files, mode, *args, model="mlp.onnx", data="calib.npz", out="out.onnx", target=True, touch=False):
    """The prune command in ``mode`` ("weights" or "units"): its result and its JSON report (if any);
    ``touch``: OUT exists before the command runs."""
    if out:
        (files / out).unlink(missing_ok=True)
        if touch:
            (files / out).write_bytes(b"an earlier result")
    report = files / "report.json"
    for stale in (report, files / "curve.png"):
        stale.unlink(missing_ok=True)
    base = ["prune", str(files / model)] + ([str(files / out)] if out else []) + ["--data", str(files / data)]
    base += ["--json", str(report), "--time-batches", "2"]
    if mode == "units":
        base.append("--structured")
    if target:
        base += ["--sparsity", "0.4"]
    res = CliRunner().invoke(main, base + [str(a) for a in args])
    return res, json.loads(report.read_text()) if report.exists() else None


def section(report):
    return report[report["mode"]]


# option -> {mode: (extra args, check)}; a check takes (result, report, files) and asserts the effect;
# "refused" asserts exit 2 with one line naming the option.
REFUSED = "refused"
MATRIX = {
    "--sparsity": {m: ([], lambda r, j, f: j["target"] == 0.4) for m in ("weights", "units")},
    "--dry-run": {m: (["--dry-run", "--ratios", "0.2,0.4"], lambda r, j, f: [p["ratio"] for p in j["points"]] == [0.2, 0.4])
                  for m in ("weights", "units")},
    "--ratios": {m: (["--dry-run", "--ratios", "0.3"], lambda r, j, f: len(j["points"]) == 1) for m in ("weights", "units")},
    "--test": {m: (["--test", "{f}/test.npz"], lambda r, j, f: "accuracy" in j["test"]["pruned"]) for m in ("weights", "units")},
    "--evaluate": {m: (["--evaluate", "{f}/test.npz"], lambda r, j, f: "accuracy" in j["test"]["pruned"])
                   for m in ("weights", "units")},
    "--max-loss-increase": {m: (["--max-loss-increase", "1000%", "--ratios", "0.2,0.4", "--test", "{f}/test.npz"],
                                lambda r, j, f: j["sensitivity"]["best_ratio"] == 0.4) for m in ("weights", "units")},
    "--max-accuracy-drop": {m: (["--max-accuracy-drop", "100", "--ratios", "0.2,0.4", "--test", "{f}/test.npz"],
                                lambda r, j, f: j["sensitivity"]["best_ratio"] == 0.4) for m in ("weights", "units")},
    "--max-output-error": {m: (["--max-output-error", "1000", "--ratios", "0.2,0.4"],
                               lambda r, j, f: j["sensitivity"]["best_ratio"] == 0.4) for m in ("weights", "units")},
    "--pattern": {"weights": (["--pattern", "2:4", "--exclude", "fc0", "--exclude", "fc2", "target=False"],
                              lambda r, j, f: j["weights"]["pattern"] == "2:4" and j["target"] == 0.5),
                  "units": (["--pattern", "2:4", "target=False"], REFUSED)},
    "--error-at": {"weights": (["--error-at", "layer"], lambda r, j, f: j["engine"]["name"] is None and not j["derivatives"]),
                   "units": (["--error-at", "layer"], REFUSED)},
    "--plot": {m: (["--dry-run", "--ratios", "0.2,0.4", "--test", "{f}/test.npz", "--plot", "{f}/curve.png"],
                   lambda r, j, f: (f / "curve.png").stat().st_size > 1000) for m in ("weights", "units")},
    "--storage": {"weights": (["--storage", "sparse"], lambda r, j, f: j["storage"]["storage"] == "sparse"),
                  "units": (["--storage", "sparse"], REFUSED)},
    "--method": {"weights": (["--method", "magnitude"], lambda r, j, f: j["method"] == "magnitude"),
                 "units": (["--method", "flap"], lambda r, j, f: j["method"] == "flap")},
    "--steps": {m: (["--steps", "3"], lambda r, j, f: j["steps"] == 3) for m in ("weights", "units")},
    "--refit": {"weights": (["--refit"], lambda r, j, f: j["repair"] == "refit" and j["refits"]),
                "units": (["--no-refit"], lambda r, j, f: j["repair"] == "none" and not j["refits"])},
    "--chain": {"weights": (["--refit", "--no-chain"], lambda r, j, f: j["repair"] == "refit (dense inputs)"),
                "units": (["--no-chain"], REFUSED)},
    "--g-weighting": {"weights": (["--refit", "--g-weighting"], lambda r, j, f: "G-weighted" in j["repair"]),
                      "units": (["--g-weighting"], REFUSED)},
    "--compensation": {"weights": (["--no-compensation"], lambda r, j, f: j["weights"]["compensation"] is False),
                       "units": (["--no-compensation"], REFUSED)},
    "--scope": {"weights": (["--scope", "layer"], lambda r, j, f: len({round(c["pruned"] / c["weights"], 1)
                                                                     for c in j["weights"]["layers"]}) == 1),
                "units": (["--scope", "layer"], lambda r, j, f: {g["units_after"] for g in j["units"]["groups"].values()}
                          == {5, 3})},
    "--exclude": {"weights": (["--exclude", "fc1"], lambda r, j, f: j["excluded"] == ["fc1"]),
                  "units": (["--exclude", "fc2"], lambda r, j, f: j["excluded"] == ["fc2"] and list(j["units"]["groups"])
                            == ["fc0"])},
    "--seed": {m: (["--method", "random", "--seed", "7"], lambda r, j, f: _written(f) != _rerun(f, j, "--seed", "8"))
               for m in ("weights", "units")},
    "--probes": {m: (["--probes", "2"], lambda r, j, f: j["derivatives"]["probes"] == 2) for m in ("weights", "units")},
    "--conv-statistics": {"weights": (["--conv-statistics", "positions", "model=cnn.onnx", "data=images.npz"],
                                      lambda r, j, f: j["weights"]["pruned"] > 0),
                          "units": (["--conv-statistics", "positions"], REFUSED)},
    "--batch-size": {m: (["--batch-size", "7"], lambda r, j, f: j["derivatives"]["batch"] == 7) for m in ("weights", "units")},
    "--output": {m: (["--output", "a1"], lambda r, j, f: j["protected_output"] == "a1") for m in ("weights", "units")},
    "--labels-key": {m: (["--test", "{f}/other_labels.npz", "--labels-key", "target", "data=other_labels.npz"],
                         lambda r, j, f: "accuracy" in j["test"]["pruned"]) for m in ("weights", "units")},
    "--provider": {m: (["--provider", "cuda", "allow=1"], lambda r, j, f: r.exit_code == 0 or "CUDA" in r.output)
                   for m in ("weights", "units")},
    "--threads": {m: (["--threads", "1", "--test", "{f}/test.npz"],
                      lambda r, j, f: [t["threads"] for t in j["timing"]["batches"]] == [1, 1]) for m in ("weights", "units")},
    "--engine": {m: (["--engine", "adjoint"], lambda r, j, f: j["engine"]["name"] == "adjoint") for m in ("weights", "units")},
    "--memory-budget": {m: (["--memory-budget", "2000"], lambda r, j, f: j["derivatives"]["batch"] < 48)
                        for m in ("weights", "units")},
    "--workers": {m: (["--workers", "2", "--batch-size", "8"], lambda r, j, f: j["derivatives"]["workers"] == 2
                      and j["derivatives"]["shards"] == 6 and j["derivatives"]["cluster"] == "local")
                  for m in ("weights", "units")},
    "--json": {m: ([], lambda r, j, f: j["mode"] in ("weights", "units")) for m in ("weights", "units")},
    "--data": {m: ([], lambda r, j, f: j["derivatives"]["outputs"] == 3) for m in ("weights", "units")},
    "--force": {m: (["--force", "touch=1"], lambda r, j, f: r.exit_code == 0 and j is not None) for m in ("weights", "units")},
    "--structured": {"weights": ([], lambda r, j, f: j["mode"] == "weights"),
                     "units": ([], lambda r, j, f: j["mode"] == "units")},
    "--macs": {"weights": (["--macs", "0.3", "target=False"], REFUSED),
               "units": (["--macs", "0.3", "target=False"], lambda r, j, f: j["units"]["of"] == "MACs"
                         and j["units"]["macs_after"] <= 0.7 * j["units"]["macs_before"])},
    "--multiple": {"weights": (["--multiple", "2"], REFUSED),
                   "units": (["--multiple", "2"], lambda r, j, f: all(g["units_after"] % 2 == 0
                                                                       for g in j["units"]["groups"].values()))},
    "--slice-inputs": {"weights": (["--slice-inputs"], REFUSED),
                       "units": (["--slice-inputs", "--scope", "layer"], lambda r, j, f: "input:x" in j["units"]["groups"]
                                 and not j["kept_inputs"])},
    "--prune-inputs": {"weights": (["--prune-inputs"], REFUSED),
                       "units": (["--prune-inputs", "--scope", "layer"], lambda r, j, f: len(j["kept_inputs"]["x"]) < 6)},
    "--time-batches": {m: (["--test", "{f}/test.npz", "--time-batches", "1,3"],
                           lambda r, j, f: [t["batch_size"] for t in j["timing"]["batches"]] == [1, 3, 1, 3])
                       for m in ("weights", "units")},
    "--verbose": {m: (["-v"], lambda r, j, f: "gradient engine" in r.output) for m in ("weights", "units")},
    "--quiet": {m: (["-q"], lambda r, j, f: r.output == "") for m in ("weights", "units")},
}
TESTED_ELSEWHERE = {"--batch-axis": "tests/test_batch_axis.py (weights and --structured)",
                    "--allow-external-data-outside": "tests/test_safety.py (read through the one model loader)",
                    "--ray": "tests/test_shards.py (a Ray head started for the session; without the extra: exit 2)"}


def _written(files) -> bytes:
    return (files / "out.onnx").read_bytes()


def _rerun(files, report, *args) -> bytes:
    """The model written by the same command with ``args`` changed."""
    run(files, report["mode"], "--method", report["method"], *args)
    return _written(files)


def test_the_matrix_covers_every_option_of_prune():
    declared = {opt for p in prune.params for opt in p.opts if opt.startswith("--")}
    assert declared == set(MATRIX) | set(TESTED_ELSEWHERE), declared ^ (set(MATRIX) | set(TESTED_ELSEWHERE))


CASES = [(option, mode) for option, modes in MATRIX.items() for mode in modes]


@pytest.mark.parametrize("option, mode", CASES, ids=[f"{o}-{m}" for o, m in CASES])
def test_every_option_acts_or_is_refused(files, option, mode):
    args, check = MATRIX[option][mode]
    extra = {"model": "mlp.onnx", "data": "calib.npz", "target": True, "touch": False, "allow": False}
    cli = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in extra and value:
            extra[key] = value if key in ("model", "data") else value in ("True", "1")
        else:
            cli.append(arg.replace("{f}", str(files)))
    dry = "--dry-run" in cli
    if dry or any(a.startswith("--max-") for a in cli):
        extra["target"] = False
    if dry:
        (files / "out.onnx").unlink(missing_ok=True)
    res, report = run(files, mode, *cli, model=extra["model"], data=extra["data"], target=extra["target"],
                      out=None if dry else "out.onnx", touch=extra["touch"])
    if check == REFUSED:
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and option.lstrip("-") in lines[0], res.output
        assert not (files / "out.onnx").exists()
        return
    if not extra["allow"]:
        assert res.exit_code == 0, res.output
    assert check(res, report, files), res.output + json.dumps(report)[:2000]
