"""One rule for computing output derivatives over the calibration data, for layer and unit sums alike.

The protected output's per-sample Jacobian at the layers' pre-activations comes from a gradient
engine (``engines``): exact (one seed per output element) up to EXACT_LIMIT elements, else P random
probes (unbiased at any number). P is chosen by a measured rule: a probe's estimate of G has a
relative variance of at most 2, and the sums average the samples, so the ranking's noise follows
P x n; on a trained detector's 24,750 outputs (docs/results/probe-rule.md) the rank correlation
with 128 probes was 0.9991 at P x n = 256 whether n was 16 or 64, and the pruned model's error
moved less than between two seeds. So P = PROBE_SAMPLES / n, at least 1, at most AUTO_PROBES, and
at most what one sample's activations and derivatives fit in the memory budget. A batch holds as
many samples as the tiled derivatives and the memory budget allow. ``plan`` makes these choices once
per model version; ``DerivativePlan.info`` says what was chosen (it goes into every report). With
an ``Objective`` in the settings (``find.objective``) the derivatives are those of the objective
tensor on top of the model: every protected output batch first and each part weighted by its
scale, so the error the sums describe is relative per part (``protected``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from onnxprune.derivatives.engines import output_jacobians
from onnxprune.find.layers import Layer
from onnxprune.find.objective import Objective
from onnxprune.graph.index import FLOAT_TYPES, tensor_types
from onnxprune.io.data import Dataset, declared_batch
from onnxprune.prepare.shapes import SHAPES, tensor_shapes

Progress = Callable[[int, int], None]  # (samples done, samples total)
BATCH_ELEMENTS = 1 << 24  # bound on the elements of one tiled batch's largest tensor
MEMORY_BUDGET = 3 << 29   # 1.5 GiB of activations and derivatives per batch: a 224x224 CNN stays under 2 GB
EXACT_LIMIT = 100         # above this many output elements, exact Jacobians give way to random probes
MAX_PROBES = 16384        # rows of one sample's tiled batch at most (a batch then holds one sample): --probes' bound
AUTO_PROBES = 32          # ... at most this many, fewer when one sample's would not fit the memory budget
PROBE_SAMPLES = 256       # ... and P x samples >= this: the ranking's noise follows P x n (docs/results/probe-rule.md)


@dataclass(frozen=True)
class DerivativeSettings:
    """What the user chose about derivatives: ``probes`` (None: exact up to EXACT_LIMIT outputs, then
    automatic), the engine, the memory budget per batch, the largest batch, provider and threads; and
    where the sums are computed: in this process (``workers`` and ``ray`` None), on ``workers`` local
    processes, or on Ray actors of the cluster at ``ray`` (an address, or "auto"), over shards of
    ``shard_size`` samples (None: chosen from the data, see ``shards.shard_size``)."""

    probes: int | None = None
    seed: int = 0
    engine: str = "auto"
    memory_budget: int = MEMORY_BUDGET
    batch_size: int = 256
    provider: str = "cpu"
    threads: int | None = None
    objective: Objective | None = None  # the protected outputs' parts and scales; None: ``output`` as it is
    workers: int | None = None
    ray: str | None = None
    shard_size: int | None = None

    @property
    def sharded(self) -> bool:
        """The sums are computed by the sharded service (``derivatives.shards``), not in this process."""
        return self.workers is not None or self.ray is not None


def protected(model: onnx.ModelProto, output: str, objective: Objective | None) -> tuple[onnx.ModelProto, str]:
    """The model and the tensor whose derivatives are taken: ``objective``'s graph on top of ``model``
    (see ``find.objective``), or ``model`` and ``output`` when there is none or it is the output itself."""
    if objective is None:
        return model, output
    return objective.graph(model)


@dataclass
class DerivativePlan:
    """The engine's derivative object for one model version and layers, the output's per-sample
    shape, and the samples per batch."""

    jac: Any
    shape: tuple[int, ...]
    step: int
    probes: int | None
    automatic: bool

    @property
    def width(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def info(self) -> dict:
        """What ran: the engine (an EngineChoice), the probes (None: exact), whether chosen automatically,
        the output's elements, the batch."""
        return {"engine": self.jac.choice, "probes": self.probes, "exact": self.probes is None,
                "automatic_probes": self.automatic, "outputs": self.width, "batch": self.step}

    def detached(self) -> DerivativePlan:
        """The same choices without the engine: what a worker process is sent (``attached`` there)."""
        return replace(self, jac=None)

    def attached(self, model: onnx.ModelProto, layers: list[Layer], output: str,
                 settings: DerivativeSettings) -> DerivativePlan:
        """The same choices with an engine of this process's own (its graph is built on the first batch),
        on ``output`` or the settings' objective over it (``protected``)."""
        return self._on(*protected(model, output, settings.objective), layers, settings)

    def _on(self, target: onnx.ModelProto, wrt: str, layers: list[Layer], settings: DerivativeSettings) -> DerivativePlan:
        jac = output_jacobians(target, layers, wrt, self.width, probes=self.probes, seed=settings.seed,
                               provider=settings.provider, threads=settings.threads, engine=settings.engine)
        return replace(self, jac=jac)

    def batches(self, data: Dataset, progress: Progress | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The calibration feeds in batches of ``step`` samples, reporting progress after each."""
        done = 0
        for feeds, _ in data.batches(self.step):
            yield feeds
            done += len(next(iter(feeds.values())))
            if progress:
                progress(done, len(data))


def sample_bytes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str = "cpu", shapes=tensor_shapes) -> int:
    """Bytes of every float tensor the model computes for one sample (measured on the first sample of
    ``feeds``); 0 when onnxruntime cannot return them all."""
    types = tensor_types(model)
    names = [out for node in model.graph.node for out in node.output if out and types.get(out) in FLOAT_TYPES]
    try:
        values = shapes(model, list(dict.fromkeys(names)), {k: v[:1] for k, v in feeds.items()}, provider)
    except Exception:  # noqa: BLE001 - an estimate only; the element bound still applies
        return 0
    return 4 * sum(int(np.prod(shape)) if shape else 1 for shape in values.values())


def batch_step(model, layers, data, repeats, batch_size, provider, memory_budget: int = MEMORY_BUDGET,
               activation_bytes: int | None = None, shapes=tensor_shapes) -> int:
    """Samples per batch: at most batch_size; few enough that the tiled batch's largest tensor (R
    copies of a pre-activation or an input) stays under BATCH_ELEMENTS; and few enough that the
    forward activations and R derivatives of every tensor, twice over for temporaries, fit
    ``memory_budget`` bytes (at least one sample). ``activation_bytes``: ``sample_bytes`` when the
    caller has measured it already."""
    names = [layer.preact for layer in layers] + [layer.input for layer in layers]
    largest = max([int(np.prod(s)) if s else 1 for s in shapes(model, names, data.subset(1).feeds, provider).values()] + [1])
    if activation_bytes is None:
        activation_bytes = sample_bytes(model, data.subset(1).feeds, provider)
    per_sample = activation_bytes * (1 + 2 * repeats)
    by_memory = memory_budget // per_sample if per_sample else batch_size
    return max(1, min(batch_size, MAX_PROBES // repeats, BATCH_ELEMENTS // (repeats * largest), by_memory))


def plan(model: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str,
         settings: DerivativeSettings) -> DerivativePlan:
    """The derivatives of ``output`` (or of ``settings.objective``) at ``layers``' pre-activations as
    ``settings`` ask, on ``model``."""
    target, wrt = protected(model, output, settings.objective)
    one = data.subset(1).arrays()
    shapes = SHAPES(target, layers, one, settings.provider)
    shape = shapes(target, [wrt], one, settings.provider)[wrt]
    width = int(np.prod(shape)) if shape else 1
    probes, automatic = settings.probes, settings.probes is None and width > EXACT_LIMIT
    activation_bytes = sample_bytes(target, one, settings.provider, shapes)
    if automatic:  # P x n >= PROBE_SAMPLES, within AUTO_PROBES and what one sample fits in the budget
        fit = (settings.memory_budget // activation_bytes - 1) // 2 if activation_bytes else AUTO_PROBES
        probes = int(max(1, min(AUTO_PROBES, fit, -(-PROBE_SAMPLES // max(len(data), 1)))))
    repeats = width if probes is None else probes
    step = declared_batch(model, data) or batch_step(  # a graph holding its traced batch runs on that many
        target, layers, data, repeats, settings.batch_size, settings.provider, settings.memory_budget, activation_bytes, shapes)
    return DerivativePlan(None, shape, step, probes, automatic)._on(target, wrt, layers, settings)
