"""Fits the performance model's free parameters to published measurements, and prints the residuals.

`python -m melange.tools.profiles.calibrate` loads `calibration.yaml` (every data point with its
source), fits `perfmodel.Calibration` by least squares on `log(model / published)` (SciPy's
bounded trust-region `least_squares` on the logarithms of the parameters, from a few fixed
starts; SciPy is the `calibrate` extra), and prints one line per point: what was published, what the fitted model says, and the
relative difference. `perfmodel.CALIBRATION` holds the fitted values, rounded; a unit test checks
they equal a fresh fit and that every point is within the file's `tolerance`.

The fit is deterministic (fixed starts, a numerical Jacobian of fixed step) and pure: no I/O
besides reading the package's own data file.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from importlib.resources import files
from typing import Any, get_args

import numpy as np
import numpy.typing as npt
import yaml

from melange.tools import perfmodel
from melange.tools.perfmodel import Calibration, Datasheet, ModelSpec

Floats = npt.NDArray[np.float64]

START = Calibration(
    gddr_bandwidth_efficiency=0.75,
    hbm_bandwidth_efficiency=0.8,
    compute_efficiency=0.55,
    a10g_compute_efficiency=0.55,
    l4_compute_efficiency=0.55,
    h100_compute_efficiency=0.55,
    step_overhead_seconds=0.002,
    per_sequence_overhead_seconds=20e-6,
    per_request_overhead_seconds=0.5e-3,
    tensor_parallel_step_seconds=0.002,
    early_step_overhead_seconds=0.005,
    early_per_sequence_overhead_seconds=50e-6,
    early_per_request_overhead_seconds=0.5e-3,
)
"""Where the fit starts, and the centre of its prior: the model's earlier, uncalibrated
first-order values (for the 2023-24 vLLM, larger step and per-sequence overheads)."""

BOUNDS: dict[str, tuple[float, float]] = {
    "gddr_bandwidth_efficiency": (0.3, 0.95),
    "hbm_bandwidth_efficiency": (0.3, 0.95),
    "compute_efficiency": (0.2, 0.9),
    "a10g_compute_efficiency": (0.2, 1.8),  # of 70 TFLOPS: up to the A10's 125
    "l4_compute_efficiency": (0.1, 0.9),
    "h100_compute_efficiency": (0.1, 0.9),
    "step_overhead_seconds": (1e-4, 0.05),
    "per_sequence_overhead_seconds": (1e-7, 1e-3),
    "per_request_overhead_seconds": (1e-6, 0.05),
    "tensor_parallel_step_seconds": (1e-5, 0.05),
    "early_step_overhead_seconds": (1e-4, 0.05),
    "early_per_sequence_overhead_seconds": (1e-7, 1e-3),
    "early_per_request_overhead_seconds": (1e-6, 0.05),
}
"""Physical ranges: an efficiency is a fraction of a datasheet peak, an overhead a time."""

PRIOR_SPREAD: dict[str, float] = {
    "gddr_bandwidth_efficiency": 0.15,
    "hbm_bandwidth_efficiency": 0.15,
    "compute_efficiency": 0.25,
    "a10g_compute_efficiency": 1.0,
    "l4_compute_efficiency": 1.0,
    "h100_compute_efficiency": 1.0,
    "step_overhead_seconds": 1.5,
    "per_sequence_overhead_seconds": 1.5,
    "per_request_overhead_seconds": 1.5,
    "tensor_parallel_step_seconds": 1.5,
    "early_step_overhead_seconds": 1.5,
    "early_per_sequence_overhead_seconds": 1.5,
    "early_per_request_overhead_seconds": 1.5,
}
"""A weak prior: the fit also minimises ((log(parameter) - log(START's)) / spread)^2, so that a
parameter the points barely constrain stays near its first-order value instead of drifting to a
bound (efficiencies: microbenchmarks reach ~80-90% of peak bandwidth and 50-60% of peak FLOP/s
in prefill-sized GEMMs; overheads: only their order of magnitude is known a priori)."""

SIGNIFICANT_DIGITS = 3
"""`perfmodel.CALIBRATION` holds the fit rounded to this many significant digits."""

METRICS = (
    "tokensPerDollarRatio",
    "singleStreamTpotSeconds",
    "tpotAtConcurrencySeconds",
    "offlineRequestsPerSecond",
)
"""What a data point can measure (calibration.yaml describes each)."""

_CAMEL = {
    "costPerHour": "cost_per_hour",
    "bf16Flops": "bf16_flops",
    "memoryBandwidth": "memory_bandwidth",
    "memoryBytes": "memory_bytes",
    "hiddenSize": "hidden_size",
    "kvHeads": "kv_heads",
    "headDim": "head_dim",
    "bytesPerParam": "bytes_per_param",
    "bytesPerKv": "bytes_per_kv",
}


@dataclass(frozen=True)
class Point:
    """One published measurement (see calibration.yaml for the metrics)."""

    id: str
    metric: str
    value: float
    gpu: str
    model: str
    input_tokens: float
    output_tokens: float
    source: str
    gpus: int = 1
    versus: str | None = None
    tpot_seconds: float | None = None
    concurrency: float | None = None
    prices: Mapping[str, float] | None = None
    note: str = ""
    engine: perfmodel.EngineEra = "current"
    tolerance: float | None = None  # this point's own, when it exceeds the file's
    disagreement: str = ""  # why the model and this measurement disagree (with `tolerance`)


@dataclass(frozen=True)
class Comparison:
    """A published grid of the cheapest GPU type per request size (not fitted, compared)."""

    id: str
    model: str
    engine: perfmodel.EngineEra
    gpus: list[str]
    input_tokens: list[int]
    output_tokens: list[int]
    cheapest: list[list[str]]  # rows: input lengths, columns: output lengths
    only_hbm_from_input: int | None
    source: str


@dataclass(frozen=True)
class Data:
    points: list[Point]
    datasheets: dict[str, Datasheet]
    models: dict[str, ModelSpec]
    tolerance: float
    prices: list[dict[str, Any]]
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)


def load(text: str | None = None) -> Data:
    """The data points of `calibration.yaml` (or of `text`), with the GPUs and models they use."""
    if text is None:
        text = files("melange.tools.profiles").joinpath("calibration.yaml").read_text("utf-8")
    document = yaml.safe_load(text)
    sheets = dict(perfmodel.DATASHEETS)
    for raw in document.get("datasheets", []):
        sheet = Datasheet(**{_CAMEL.get(k, k): v for k, v in raw.items()})
        sheets[sheet.name] = sheet
    models = dict(perfmodel.MODELS)
    for raw in document.get("models", []):
        model = ModelSpec(**{_CAMEL.get(k, k): v for k, v in raw.items()})
        models[model.name] = model
    points = [
        Point(
            id=str(raw["id"]),
            metric=str(raw["metric"]),
            value=float(raw["value"]),
            gpu=str(raw["gpu"]),
            model=str(raw["model"]),
            input_tokens=float(raw["inputTokens"]),
            output_tokens=float(raw["outputTokens"]),
            source=str(raw["source"]),
            gpus=int(raw.get("gpus", 1)),
            versus=raw.get("versus"),
            tpot_seconds=raw.get("tpotSeconds"),
            concurrency=raw.get("concurrency"),
            prices=raw.get("prices"),
            note=str(raw.get("note", "")),
            engine=raw.get("engine", "current"),
            tolerance=raw.get("tolerance"),
            disagreement=" ".join(str(raw.get("disagreement", "")).split()),
        )
        for raw in document["points"]
    ]
    for point in points:
        if point.metric not in METRICS:
            raise ValueError(f"point {point.id}: unknown metric {point.metric!r}")
        if point.engine not in get_args(perfmodel.EngineEra):
            raise ValueError(f"point {point.id}: unknown engine {point.engine!r}")
        if point.value <= 0:
            raise ValueError(f"point {point.id}: value must be > 0, got {point.value}")
    comparisons = [
        Comparison(
            id=str(raw["id"]),
            model=str(raw["model"]),
            engine=raw.get("engine", "current"),
            gpus=[str(g) for g in raw["gpus"]],
            input_tokens=[int(v) for v in raw["inputTokens"]],
            output_tokens=[int(v) for v in raw["outputTokens"]],
            cheapest=[[str(v) for v in row] for row in raw["cheapest"]],
            only_hbm_from_input=raw.get("onlyHbmFromInput"),
            source=str(raw["source"]),
        )
        for raw in document.get("comparisons", [])
    ]
    return Data(
        points,
        sheets,
        models,
        float(document["tolerance"]),
        document.get("prices", []),
        comparisons,
    )


def model_cheapest(
    comparison: Comparison, tpot_seconds: float, calibration: Calibration = perfmodel.CALIBRATION
) -> list[list[str | None]]:
    """The calibrated model's cheapest type (cost per request) for each request size of
    `comparison`, among its GPU types (HBM ones only where the comparison says so)."""
    model = perfmodel.MODELS[comparison.model]
    grid: list[list[str | None]] = []
    for i in comparison.input_tokens:
        row: list[str | None] = []
        for o in comparison.output_tokens:
            best: tuple[float, str] | None = None
            for name in comparison.gpus:
                sheet = perfmodel.DATASHEETS[name]
                if (
                    comparison.only_hbm_from_input is not None
                    and i >= comparison.only_hbm_from_input
                    and sheet.memory != "hbm"
                ):
                    continue
                gpu = perfmodel.gpu_instance(sheet, 1, calibration)
                engine = perfmodel.engine_for(gpu, calibration, comparison.engine)
                rate = perfmodel.request_throughput(gpu, model, i, o, tpot_seconds, engine=engine)
                if rate > 0 and (best is None or sheet.cost_per_hour / rate < best[0]):
                    best = (sheet.cost_per_hour / rate, name)
            row.append(None if best is None else best[1])
        grid.append(row)
    return grid


def agreement(comparison: Comparison, tpot_seconds: float) -> tuple[int, int]:
    """(tiles where the model's cheapest type is the published one, tiles)."""
    ours = model_cheapest(comparison, tpot_seconds)
    pairs = [
        (a, b)
        for mine, theirs in zip(ours, comparison.cheapest, strict=True)
        for a, b in zip(mine, theirs, strict=True)
    ]
    return sum(a == b for a, b in pairs), len(pairs)


def comparison_lines(comparison: Comparison, slos: Sequence[float]) -> list[str]:
    """The published grid and, per TPOT SLO, the model's: one row per input length, one column
    per output length; `*` marks a tile where the model's cheapest type is not the published one."""

    def table(title: str, grid: Sequence[Sequence[str | None]], marks: bool) -> list[str]:
        header = "INPUT \\ OUTPUT".ljust(16) + "".join(f"{o:>11}" for o in comparison.output_tokens)
        lines = [title, header]
        for i, row, published in zip(
            comparison.input_tokens, grid, comparison.cheapest, strict=True
        ):
            cells = [
                (w or "-") + ("*" if marks and w != p else " ")
                for w, p in zip(row, published, strict=True)
            ]
            lines.append(f"{i:<16}" + "".join(f"{c:>11}" for c in cells))
        return lines

    lines = table(f"{comparison.id}: published", comparison.cheapest, marks=False)
    for slo in slos:
        agree, tiles = agreement(comparison, slo)
        lines.append("")
        lines.extend(
            table(
                f"the model at a {slo * 1000:g} ms TPOT SLO ({comparison.engine} engine): "
                f"{agree} of {tiles} agree",
                model_cheapest(comparison, slo),
                marks=True,
            )
        )
    return lines


COMPARISON_SLOS = (0.04, 0.12)
"""The tight and the loose TPOT SLO of the Mélange paper, at which comparisons are printed."""


def predict(point: Point, calibration: Calibration, data: Data) -> float:
    """What the model with `calibration` says for `point`'s metric."""
    model = data.models[point.model]

    def instance(name: str) -> perfmodel.GpuSpec:
        return perfmodel.gpu_instance(data.datasheets[name], point.gpus, calibration)

    gpu = instance(point.gpu)
    engine = perfmodel.engine_for(gpu, calibration, point.engine)
    i, o = point.input_tokens, point.output_tokens
    if point.metric == "singleStreamTpotSeconds":
        return perfmodel.single_stream_tpot(gpu, model, i, o, engine=engine)
    if point.metric == "tpotAtConcurrencySeconds":
        if point.concurrency is None:
            raise ValueError(f"point {point.id}: {point.metric} needs concurrency")
        return perfmodel.step_seconds(gpu, model, i, o, float(point.concurrency), engine=engine)
    if point.metric == "offlineRequestsPerSecond":
        return perfmodel.request_throughput(gpu, model, i, o, 1000.0, engine=engine)
    if point.metric == "tokensPerDollarRatio":
        if point.versus is None or point.tpot_seconds is None:
            raise ValueError(f"point {point.id}: {point.metric} needs versus and tpotSeconds")
        other = instance(point.versus)
        prices = point.prices or {
            name: data.datasheets[name].cost_per_hour for name in (point.gpu, point.versus)
        }
        mine = perfmodel.request_throughput(gpu, model, i, o, point.tpot_seconds, engine=engine)
        theirs = perfmodel.request_throughput(
            other,
            model,
            i,
            o,
            point.tpot_seconds,
            engine=perfmodel.engine_for(other, calibration, point.engine),
        )
        if theirs <= 0:
            return math.inf
        return (mine / prices[point.gpu]) / (theirs / prices[point.versus])
    raise ValueError(f"point {point.id}: unknown metric {point.metric!r}")


def _names() -> list[str]:
    return [f.name for f in fields(Calibration)]


def _from_logs(logs: Floats) -> Calibration:
    values = []
    for name, log in zip(_names(), logs, strict=True):
        low, high = BOUNDS[name]
        values.append(math.exp(min(max(float(log), math.log(low)), math.log(high))))
    return Calibration(*values)


def residuals(calibration: Calibration, data: Data) -> Floats:
    """log(model / published) per point (a point the model cannot serve counts as a factor e^5)."""
    out = []
    for point in data.points:
        predicted = predict(point, calibration, data)
        out.append(math.log(predicted / point.value) if 0 < predicted < math.inf else 5.0)
    return np.array(out)


def starts(start: Calibration = START) -> list[Calibration]:
    """Where the fit starts from: `start`, and `start` with its efficiencies and its overheads
    scaled (the residuals have kinks where a bound changes, so one start can stall)."""
    out = []
    for efficiency in (1.0, 0.8, 1.2):
        for overhead in (1.0, 0.3, 3.0):
            values = {
                f.name: getattr(start, f.name)
                * (efficiency if "efficiency" in f.name else overhead)
                for f in fields(Calibration)
            }
            out.append(Calibration(**values))
    return out


def fit(data: Data | None = None, start: Calibration = START, *, prior: bool = True) -> Calibration:
    """The least-squares fit of the model's parameters to `data` (default: calibration.yaml):
    the best of a bounded trust-region run (SciPy's `least_squares`, on the logarithms of the
    parameters, within `BOUNDS`) from each of `starts(start)`; with `prior`, the weak pull towards
    `start` of `PRIOR_SPREAD` is part of what is minimised."""
    from scipy.optimize import least_squares  # the `calibrate` extra: only the fit needs it

    data = load() if data is None else data
    centre = np.log(np.array(astuple(start), dtype=float))
    spread = np.array([PRIOR_SPREAD[name] for name in _names()])
    low = np.log(np.array([BOUNDS[name][0] for name in _names()]))
    high = np.log(np.array([BOUNDS[name][1] for name in _names()]))

    def objective(logs: Floats) -> Floats:
        pull = (logs - centre) / spread if prior else np.zeros(0)
        return np.concatenate([residuals(_from_logs(logs), data), pull])

    best, best_cost = start, math.inf
    for initial in starts(start):
        logs = np.clip(np.log(np.array(astuple(initial), dtype=float)), low, high)
        found = least_squares(
            objective, logs, bounds=(low, high), method="trf", diff_step=1e-6, x_scale="jac"
        )
        if float(found.cost) < best_cost:
            best, best_cost = _from_logs(found.x), float(found.cost)
    return best


def rounded(calibration: Calibration, digits: int = SIGNIFICANT_DIGITS) -> Calibration:
    """Each parameter to `digits` significant digits, as `perfmodel.CALIBRATION` holds them."""
    return Calibration(*(float(f"{v:.{digits}g}") for v in astuple(calibration)))


def difference(point: Point, calibration: Calibration, data: Data) -> float:
    """model / published - 1 for one point."""
    return predict(point, calibration, data) / point.value - 1


def tolerance(point: Point, data: Data) -> float:
    """The largest |difference| the point is allowed: its own, else the file's."""
    return data.tolerance if point.tolerance is None else float(point.tolerance)


def outside(calibration: Calibration, data: Data) -> list[str]:
    """The points whose difference exceeds their tolerance, each with both (empty: all within)."""
    return [
        f"{p.id}: {difference(p, calibration, data):+.1%} (tolerance {tolerance(p, data):.0%})"
        for p in data.points
        if not abs(difference(p, calibration, data)) <= tolerance(p, data)
    ]


def report(calibration: Calibration, data: Data) -> list[str]:
    """One line per point: published, model, relative difference, tolerance; the disagreements
    the data file states; then the parameters."""
    header = f"{'POINT':48} {'METRIC':25} {'PUBLISHED':>10} {'MODEL':>10} {'DIFF':>7} {'TOL':>5}"
    lines = [header]
    for point in data.points:
        predicted = predict(point, calibration, data)
        lines.append(
            f"{point.id:48} {point.metric:25} {point.value:10.4g} {predicted:10.4g} "
            f"{predicted / point.value - 1:+7.1%} {tolerance(point, data):5.0%}"
        )
    lines.append("")
    lines.extend(f"{p.id}: {p.disagreement}" for p in data.points if p.disagreement)
    lines.append("")
    lines.extend(
        f"{name} = {value:.4g}" for name, value in zip(_names(), astuple(calibration), strict=True)
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print the fit of calibration.yaml, and how the shipped constants (CALIBRATION) fare."""
    del argv
    data = load()
    fitted = rounded(fit(data))
    print("fit of calibration.yaml (rounded as perfmodel.CALIBRATION holds it):")
    for line in report(fitted, data):
        print(line)
    for comparison in data.comparisons:
        print("")
        for line in comparison_lines(comparison, COMPARISON_SLOS):
            print(line)
    problems = outside(fitted, data)
    for problem in problems:
        print(f"outside its tolerance: {problem}")
    if problems:
        return 1
    if fitted != perfmodel.CALIBRATION:
        print(
            "\nperfmodel.CALIBRATION differs from this fit: update it, then run "
            "`python -m melange.tools.profiles.build`"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
