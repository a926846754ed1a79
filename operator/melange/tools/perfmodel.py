"""First-order performance model: estimated throughput profiles for GPUs nobody has profiled yet.

Mélange needs, for every GPU type, the request rate one instance sustains for each request-size
bucket within the TPOT SLO. Measuring that takes a GPU and an afternoon per type; on day one users
have neither, so this module derives a profile from datasheet numbers with a roofline model of a
continuous-batching engine (vLLM-like, chunked prefill), whose free parameters (the fraction of
peak bandwidth and FLOP/s an engine reaches, its host overheads, the cost of tensor parallelism)
are fitted to published measurements: `melange.tools.profiles.calibrate` fits them to the data
points of `melange/tools/profiles/calibration.yaml` (each with its source) and `CALIBRATION` holds
the result. It is still an *estimate*: every profile built from it is labelled `source: estimate`
and carries `describe_inputs(...)` so it can be told apart from, and replaced by, a measured one.

The model, per bucket (all quantities are averages over a steady state):

* Representative request: input `I` and output `O` tokens chosen from the bucket edges
  (`representative_size`; by default the mean of lengths spread evenly in log space).
* Average in-flight context `ctx = I + O/2`: a request is decoding, on average, halfway through its
  output. It sets the KV-cache bytes each request holds and reads per decode step.
* One engine step (one output token for each of the `B` running requests, with the prompts of newly
  admitted requests processed in the same forward pass as chunked prefill) takes
  `t(B) = step_overhead + B * host_per_seq + max(bytes(B) / eff_bandwidth, flops(B) / eff_flops)`
  where `bytes(B) = weights + B * ctx * kv_bytes_per_token`,
  `flops(B) = B * (2 * params + attention(ctx) + prefill_flops(I) / O)` and
  `host_per_seq = per_sequence_overhead + per_request_overhead / O`: each step admits `B / O` new
  requests on average, whose prefill shares the step's weight read (so it only adds FLOPs) and whose
  host-side handling (HTTP, tokenising, admission) runs in the same loop.
* Time per output token is `t(B)`, so `B` is the largest batch with `t(B) <= SLO`, further capped
  by the KV-cache memory (`(memory * (1 - reserve) - weights) / (ctx * kv_bytes_per_token)`) and
  by the engine's maximum batch size. `B` is a mean occupancy, so it is not rounded to an integer,
  and may be below 1 when long prefills keep the engine from decoding all the time (the fluid view
  of a scheduler that sizes prefill chunks to keep each step within the SLO).
* Throughput is `B / (O * t(B))` requests/s: a request holds one of `B` slots for `O` steps.
* Zero when the weights do not fit, when one request's full KV cache (`I + O` tokens) does not
  fit, or when even a batch of one misses the SLO, i.e. a request decoding alone takes longer than
  the SLO per step (without prefill or per-request work: those precede its first token, so they
  count against TTFT, not TPOT).

Why cheap GPUs win the smallest requests and 80 GB HBM GPUs the longest (the Mélange paper's
observation): tiny requests are compute- and host-bound, not bandwidth-bound. The engine's batch
cap and its host overheads (per step, per sequence, per request) are the same on every GPU, so a
faster card spends a growing share of each step on work its FLOP/s do not speed up, and cost per
request drifts towards following the hourly price. Long requests are KV-cache bound: a 24 GB card
holds only a few long contexts next to 16 GB of Llama-3.1-8B weights and every step re-reads them,
so capacity and bandwidth per dollar decide and the A100-80GB wins (the H100 is faster but costs
twice as much). The paper measured no L40S; with its datasheet, the fitted efficiencies of the
other GDDR cards and its price, the model finds it the cheapest type for most mid-sized buckets
(48 GB holds many more sequences than a 24 GB card, at less than an A100's price) -- a prediction
no published L40S measurement in calibration.yaml checks yet. `melange profiles cheapest` prints
the cheapest type per bucket.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any, Literal, get_args

RepresentativeRule = Literal["mean", "geometric", "arithmetic", "upper"]
"""How a bucket `[lo, hi)` is reduced to one request size (see `representative_size`)."""

ESTIMATE_SCHEMA_VERSION = 1
"""Bump when the formulas change, so stored estimates can be told apart from newer ones."""


@dataclass(frozen=True)
class GpuSpec:
    """An instance of one GPU type: datasheet peaks, an hourly price, and the fraction of each peak
    an engine gets (fitted to published measurements, `melange.tools.profiles.calibrate`).

    `compute_efficiency` is the achieved fraction of dense BF16 FLOP/s; `bandwidth_efficiency` the
    achieved fraction of memory bandwidth in decode. Memory is the datasheet capacity read as
    10^9 bytes, slightly below the GiB the card really has; the engine's reserve is applied on top.
    An instance of `gpus` > 1 GPUs serves one model replica with tensor parallelism: its price,
    FLOP/s, bandwidth and memory are the sums over its GPUs (`gpu_instance`).
    """

    name: str
    cost_per_hour: float  # USD, on-demand, the whole instance
    bf16_flops: float  # dense (no sparsity) BF16 tensor-core FLOP/s
    memory_bandwidth: float  # bytes/s
    memory_bytes: float
    compute_efficiency: float = 0.55
    bandwidth_efficiency: float = 0.75
    gpus: int = 1  # GPUs per instance (the tensor-parallel degree)

    @property
    def effective_flops(self) -> float:
        return self.bf16_flops * self.compute_efficiency

    @property
    def effective_bandwidth(self) -> float:
        return self.memory_bandwidth * self.bandwidth_efficiency


MemoryKind = Literal["gddr", "hbm"]


@dataclass(frozen=True)
class Datasheet:
    """One GPU as its vendor and its cloud list it; `memory` says which fitted bandwidth
    efficiency applies (GDDR6 cards and HBM cards reach different fractions of their peak)."""

    name: str
    cost_per_hour: float  # USD, on-demand, one GPU (source and date in calibration.yaml)
    bf16_flops: float
    memory_bandwidth: float
    memory_bytes: float
    memory: MemoryKind


@dataclass(frozen=True)
class Calibration:
    """The performance model's free parameters, fitted to published measurements by
    `melange.tools.profiles.calibrate` (the data points and their sources are in
    `melange/tools/profiles/calibration.yaml`; `CALIBRATION` holds the fitted values)."""

    gddr_bandwidth_efficiency: float
    hbm_bandwidth_efficiency: float
    compute_efficiency: float
    # NVIDIA publishes no A10G datasheet: its tensor FLOP/s (70 TFLOPS is the figure commonly
    # quoted, the A10's datasheet says 125) are uncertain, so its efficiency is fitted on its own.
    a10g_compute_efficiency: float
    # The L4 is held to 72 W: under sustained tensor load it runs below the clocks its datasheet
    # FLOP/s assume, so its efficiency is fitted on its own too (to the paper's L4 points).
    l4_compute_efficiency: float
    # The H100's FLOP/s lead over the A100 is what the Mélange paper's H100 vs A100 figure tests
    # (prefill-heavy requests); its efficiency is fitted on its own to those points.
    h100_compute_efficiency: float
    step_overhead_seconds: float
    per_sequence_overhead_seconds: float
    per_request_overhead_seconds: float
    tensor_parallel_step_seconds: float  # added to each step of an instance of more than one GPU
    # The same host overheads for the vLLM of 2023-24 (v0.2-0.3, the Mélange paper's engine):
    # before CUDA graphs by default and the multi-step and asynchronous scheduling of later
    # versions, host work per step and per sequence was several times larger. The paper's own
    # measurements are fitted with these; the shipped profiles use the current ones above.
    early_step_overhead_seconds: float
    early_per_sequence_overhead_seconds: float
    early_per_request_overhead_seconds: float


# Datasheet figures: dense BF16 tensor FLOP/s, half the "with sparsity" number NVIDIA headlines.
# Prices are on-demand USD/h for one GPU (calibration.yaml says where each was listed and when);
# real prices vary by cloud, region and date, so override `cost_per_hour` before trusting a cost
# comparison.
DATASHEETS: dict[str, Datasheet] = {
    sheet.name: sheet
    for sheet in (
        # NVIDIA L4 datasheet: BF16 tensor 242 TFLOPS with sparsity -> 121 dense; 24 GB GDDR6,
        # 300 GB/s. Price: GCP g2-standard-4 (1x L4), about $0.70/h.
        Datasheet("L4", 0.70, 121e12, 300e9, 24e9, "gddr"),
        # AWS A10G: NVIDIA publishes no datasheet; 70 TFLOPS dense FP16/BF16 tensor is the commonly
        # quoted figure (the A10 datasheet says 125 dense / 250 sparse); 24 GB GDDR6, 600 GB/s.
        # Price: AWS g5.xlarge, $1.006/h (the Mélange paper's $1.01).
        Datasheet("A10G", 1.01, 70e12, 600e9, 24e9, "gddr"),
        # NVIDIA L40S datasheet: BF16 tensor 733 TFLOPS with sparsity -> 362.05 dense; 48 GB GDDR6,
        # 864 GB/s. Price: AWS g6e.xlarge, $1.861/h.
        Datasheet("L40S", 1.86, 362.05e12, 864e9, 48e9, "gddr"),
        # NVIDIA A100 datasheet (80GB SXM): BF16 tensor 312 TFLOPS dense (624 sparse); 80 GB HBM2e,
        # 2,039 GB/s. Price: $3.67/h, the figure the Mélange reference implementation uses.
        Datasheet("A100-80GB", 3.67, 312e12, 2039e9, 80e9, "hbm"),
        # NVIDIA H100 SXM5 datasheet: BF16 tensor 1,979 TFLOPS with sparsity -> 989 dense; 80 GB
        # HBM3, 3.35 TB/s. Price: ~$7.5/h per GPU on the large clouds' 8-GPU on-demand instances.
        Datasheet("H100", 7.52, 989e12, 3350e9, 80e9, "hbm"),
    )
}

# Fitted by `python -m melange.tools.profiles.calibrate` (which prints every point's residual);
# tests/unit/test_calibration.py checks these equal a fresh fit, so they cannot drift from the data.
CALIBRATION = Calibration(
    gddr_bandwidth_efficiency=0.765,
    hbm_bandwidth_efficiency=0.766,
    compute_efficiency=0.586,
    a10g_compute_efficiency=0.705,
    l4_compute_efficiency=0.353,
    h100_compute_efficiency=0.416,
    step_overhead_seconds=0.00174,
    per_sequence_overhead_seconds=1.98e-05,
    per_request_overhead_seconds=0.000499,
    tensor_parallel_step_seconds=0.00194,
    early_step_overhead_seconds=0.0052,
    early_per_sequence_overhead_seconds=0.000147,
    early_per_request_overhead_seconds=0.000519,
)

EngineEra = Literal["current", "early-vllm"]
"""Which fitted host overheads an engine has: today's engines', or the 2023-24 vLLM's."""


def gpu_instance(
    sheet: Datasheet, gpus: int = 1, calibration: Calibration = CALIBRATION
) -> GpuSpec:
    """An instance of `gpus` GPUs of one datasheet, with the calibrated efficiencies.

    One GPU keeps the datasheet's name (`H100`); more are named `H100x2` and cost `gpus` times
    the GPU's price, with `gpus` times its FLOP/s, bandwidth and memory (tensor parallelism shares
    the weights and the KV cache among them).
    """
    if gpus < 1:
        raise ValueError(f"an instance has at least one GPU, got {gpus}")
    bandwidth = (
        calibration.gddr_bandwidth_efficiency
        if sheet.memory == "gddr"
        else calibration.hbm_bandwidth_efficiency
    )
    return GpuSpec(
        sheet.name if gpus == 1 else f"{sheet.name}x{gpus}",
        round(sheet.cost_per_hour * gpus, 6),
        sheet.bf16_flops * gpus,
        sheet.memory_bandwidth * gpus,
        sheet.memory_bytes * gpus,
        compute_efficiency={
            "A10G": calibration.a10g_compute_efficiency,
            "L4": calibration.l4_compute_efficiency,
            "H100": calibration.h100_compute_efficiency,
        }.get(sheet.name, calibration.compute_efficiency),
        bandwidth_efficiency=bandwidth,
        gpus=gpus,
    )


GPUS: dict[str, GpuSpec] = {name: gpu_instance(sheet) for name, sheet in DATASHEETS.items()}
"""One-GPU instances of every datasheet type, calibrated."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, as far as serving cost goes: weights and KV cache per token."""

    name: str
    params: float
    layers: int
    hidden_size: int  # = attention heads * head_dim for the Llama family
    kv_heads: int
    head_dim: int
    bytes_per_param: float = 2.0  # BF16 weights
    bytes_per_kv: float = 2.0  # BF16 KV cache

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V, for every layer and KV head: what one token of context costs in memory."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_kv


MODELS: dict[str, ModelSpec] = {
    model.name: model
    for model in (
        # Llama-3.1-8B: grouped-query attention, 8 KV heads -> 128 KiB of KV cache per token.
        ModelSpec("llama-3.1-8b", 8.03e9, 32, 4096, 8, 128),
        # Llama-2-7B: multi-head attention, 32 KV heads -> 512 KiB per token (4x Llama-3.1-8B).
        ModelSpec("llama-2-7b", 6.74e9, 32, 4096, 32, 128),
        # Llama-3.1-70B: 80 layers, 8 KV heads -> 320 KiB per token; 141 GB of BF16 weights, so
        # it needs an instance of several GPUs (SHIPPED_INSTANCES).
        ModelSpec("llama-3.1-70b", 70.55e9, 80, 8192, 8, 128),
    )
}


@dataclass(frozen=True)
class EngineSpec:
    """The serving engine's limits and overheads (vLLM defaults, overheads fitted).

    `max_batch_size` is vLLM's default `max_num_seqs`; `memory_reserve_fraction` its default
    `gpu_memory_utilization=0.9` (the rest holds activations, CUDA graphs and fragmentation).
    The overheads are time a step spends on work that the GPU's FLOP/s and bandwidth do not
    explain: per step (scheduling, input preparation, kernel launches and, on an instance of
    several GPUs, the tensor-parallel all-reduces), per running sequence per step (sampling
    bookkeeping, detokenising, stop checks, streaming) and per request (HTTP, tokenising,
    admission and teardown). Their values are fitted (`CALIBRATION`); `engine_for` gives an
    instance its engine.
    """

    max_batch_size: int = 256
    step_overhead_seconds: float = 0.002
    per_sequence_overhead_seconds: float = 20e-6
    per_request_overhead_seconds: float = 0.5e-3
    memory_reserve_fraction: float = 0.10


def engine_for(
    gpu: GpuSpec, calibration: Calibration = CALIBRATION, era: EngineEra = "current"
) -> EngineSpec:
    """The calibrated engine on `gpu`: the fitted overheads of `era`, plus the tensor-parallel
    step cost on an instance of more than one GPU."""
    tensor_parallel = calibration.tensor_parallel_step_seconds if gpu.gpus > 1 else 0.0
    c = calibration
    if era == "current":
        step, per_sequence, per_request = (
            c.step_overhead_seconds,
            c.per_sequence_overhead_seconds,
            c.per_request_overhead_seconds,
        )
    elif era == "early-vllm":
        step, per_sequence, per_request = (
            c.early_step_overhead_seconds,
            c.early_per_sequence_overhead_seconds,
            c.early_per_request_overhead_seconds,
        )
    else:
        raise ValueError(f"unknown engine era {era!r}; use one of {get_args(EngineEra)}")
    return EngineSpec(
        step_overhead_seconds=round(step + tensor_parallel, 9),
        per_sequence_overhead_seconds=per_sequence,
        per_request_overhead_seconds=per_request,
    )


DEFAULT_ENGINE = engine_for(GPUS["A100-80GB"])
"""The calibrated engine of a one-GPU instance."""
DEFAULT_INPUT_EDGES: tuple[int, ...] = (1, 25, 100, 250, 500, 1000, 2000, 4000, 8000)
DEFAULT_OUTPUT_EDGES: tuple[int, ...] = (1, 25, 100, 250, 500, 1000, 2000)
DEFAULT_SIGNIFICANT_DIGITS = 4
SHIPPED_MODEL = "llama-3.1-8b"
SHIPPED_GPUS: tuple[str, ...] = ("L4", "A10G", "L40S", "A100-80GB", "H100")
SHIPPED_TPOT_SECONDS: tuple[float, ...] = (0.040, 0.120)
SHIPPED_INSTANCES: dict[str, dict[str, int]] = {
    # one GPU of each type holds Llama-3.1-8B (16 GB of weights)
    "llama-3.1-8b": dict.fromkeys(SHIPPED_GPUS, 1),
    # Llama-3.1-70B's 141 GB of BF16 weights: the fewest GPUs of each type that hold them with
    # room for a KV cache, as the clouds sell them (AWS g6.48xlarge 8x L4, g5.48xlarge 8x A10G,
    # g6e.12xlarge 4x L40S; 2x A100-80GB and 2x H100, the pairs the Mélange paper used for
    # Llama2-70B). Two A100s leave only ~3 GB for the KV cache: long requests barely fit.
    "llama-3.1-70b": {"L4": 8, "A10G": 8, "L40S": 4, "A100-80GB": 2, "H100": 2},
}
"""Per shipped model, the GPU types it is shipped for and how many GPUs an instance has."""


def representative_size(low: float, high: float, rule: RepresentativeRule = "mean") -> float:
    """The one request length that stands for bucket `[low, high)`.

    The default edges grow roughly geometrically and real length distributions are close to
    log-normal, so within a bucket lengths are spread about evenly in log space.
    `mean` (default): (high - low) / ln(high / low), the mean length of such a spread. A bucket's
    throughput is a rate of requests, and the work a stream of them brings is its mean work, not
    its median's: a profile at the median (`geometric`, sqrt(low * high), 5 tokens for [1, 25)
    against a mean of 7.5) overstates how many requests of the bucket an instance serves.
    `arithmetic`: (low + high) / 2, which lets the upper edge dominate (13 tokens for [1, 25)).
    `upper`: high, the bucket's worst case (a conservative profile).
    """
    if not 0 < low < high:
        raise ValueError(f"bucket edges must satisfy 0 < low < high, got [{low}, {high})")
    if rule == "mean":
        return (high - low) / math.log(high / low)
    if rule == "geometric":
        return math.sqrt(low * high)
    if rule == "arithmetic":
        return (low + high) / 2
    if rule == "upper":
        return float(high)
    raise ValueError(
        f"unknown representative rule {rule!r}; use one of {get_args(RepresentativeRule)}"
    )


def round_significant(value: float, digits: int = DEFAULT_SIGNIFICANT_DIGITS) -> float:
    """Round to `digits` significant digits, so a profile's text is stable and free of noise."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    return float(f"{value:.{digits}g}") if value else 0.0


def request_throughput(
    gpu: GpuSpec,
    model: ModelSpec,
    input_tokens: float,
    output_tokens: float,
    tpot_slo_seconds: float,
    *,
    engine: EngineSpec | None = None,
) -> float:
    """Max requests/s ONE `gpu` sustains serving only requests of this size within the TPOT SLO.

    Unrounded; 0.0 when the model or one request does not fit, or a batch of one misses the SLO.
    See the module docstring for the model.
    """
    if input_tokens < 0 or output_tokens < 1 or tpot_slo_seconds <= 0:
        raise ValueError(
            "need input_tokens >= 0, output_tokens >= 1 and tpot_slo_seconds > 0, got "
            f"{input_tokens}, {output_tokens}, {tpot_slo_seconds}"
        )
    engine = engine_for(gpu) if engine is None else engine
    kv_per_token = model.kv_bytes_per_token
    kv_budget = gpu.memory_bytes * (1 - engine.memory_reserve_fraction) - model.weight_bytes
    if kv_budget <= 0 or (input_tokens + output_tokens) * kv_per_token > kv_budget:
        return 0.0  # the weights, or a single request's full KV cache, do not fit

    context = input_tokens + output_tokens / 2
    bandwidth, flops = gpu.effective_bandwidth, gpu.effective_flops
    weights_read = model.weight_bytes / bandwidth  # every step streams all weights once
    bytes_per_seq = context * kv_per_token  # each running request's KV cache, read every step
    attention = 2 * model.layers * model.hidden_size  # x tokens^2 (causal) or x 2*context (decode)
    decode_flops = 2 * model.params + 2 * attention * context  # one output token
    prefill_flops = 2 * model.params * input_tokens + attention * input_tokens**2
    flops_per_seq = decode_flops + prefill_flops / output_tokens
    fixed = engine.step_overhead_seconds
    slo = tpot_slo_seconds

    # A request decoding alone: its own prefill and host work come before its first token.
    alone = fixed + engine.per_sequence_overhead_seconds
    alone += max(weights_read + bytes_per_seq / bandwidth, decode_flops / flops)
    if alone > slo:
        return 0.0  # even a batch of one misses the SLO

    # Under load, per running sequence per step: host work, with each request's share spread
    # over its O steps like its prefill. A batch below 1 is a real steady state: long prompts
    # whose prefill leaves the engine decoding only part of the time.
    per_seq = (
        engine.per_sequence_overhead_seconds + engine.per_request_overhead_seconds / output_tokens
    )
    batch = min(
        (slo - fixed - weights_read) / (per_seq + bytes_per_seq / bandwidth),  # memory-bound side
        (slo - fixed) / (per_seq + flops_per_seq / flops),  # compute-bound side
        kv_budget / bytes_per_seq,  # KV-cache capacity at the average context
        float(engine.max_batch_size),
    )
    memory_time = weights_read + batch * bytes_per_seq / bandwidth
    step = fixed + batch * per_seq + max(memory_time, batch * flops_per_seq / flops)
    return batch / (output_tokens * step)


def step_seconds(
    gpu: GpuSpec,
    model: ModelSpec,
    input_tokens: float,
    output_tokens: float,
    batch: float,
    *,
    engine: EngineSpec | None = None,
) -> float:
    """One engine step with `batch` requests of this size running (the time per output token at
    that occupancy): the model's `t(B)`, with each request's prefill and host work spread over
    its output steps. `batch = 1` with `output_tokens` large is a request decoding alone."""
    engine = engine_for(gpu) if engine is None else engine
    context = input_tokens + output_tokens / 2
    kv = context * model.kv_bytes_per_token
    attention = 2 * model.layers * model.hidden_size
    decode_flops = 2 * model.params + 2 * attention * context
    prefill_flops = 2 * model.params * input_tokens + attention * input_tokens**2
    per_seq = (
        engine.per_sequence_overhead_seconds + engine.per_request_overhead_seconds / output_tokens
    )
    memory = (model.weight_bytes + batch * kv) / gpu.effective_bandwidth
    compute = batch * (decode_flops + prefill_flops / output_tokens) / gpu.effective_flops
    return engine.step_overhead_seconds + batch * per_seq + max(memory, compute)


def single_stream_tpot(
    gpu: GpuSpec,
    model: ModelSpec,
    input_tokens: float,
    output_tokens: float,
    *,
    engine: EngineSpec | None = None,
) -> float:
    """The time per output token of one request decoding alone (the model's batch-of-one step,
    whose prefill and admission precede its first token)."""
    engine = engine_for(gpu) if engine is None else engine
    context = input_tokens + output_tokens / 2
    attention = 2 * model.layers * model.hidden_size
    memory = (model.weight_bytes + context * model.kv_bytes_per_token) / gpu.effective_bandwidth
    compute = (2 * model.params + 2 * attention * context) / gpu.effective_flops
    return (
        engine.step_overhead_seconds + engine.per_sequence_overhead_seconds + max(memory, compute)
    )


def _check_edges(edges: list[int], what: str) -> None:
    if len(edges) < 2 or any(e < 1 for e in edges) or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"{what} must be >= 2 strictly increasing integers >= 1, got {edges}")


def estimate_throughput(
    gpu: GpuSpec,
    model: ModelSpec,
    input_edges: list[int],
    output_edges: list[int],
    tpot_slo_seconds: float,
    *,
    engine: EngineSpec | None = None,
    representative: RepresentativeRule = "mean",
    significant_digits: int = DEFAULT_SIGNIFICANT_DIGITS,
) -> list[list[float]]:
    """The throughput matrix (rows: input buckets, columns: output buckets) as `spec.gpus[]` wants.

    `input_edges`/`output_edges` are bucket edges as in the custom resource's `spec.buckets`
    (n + 1 edges -> n buckets). Values are req/s rounded to `significant_digits`, 0 = cannot serve.
    """
    _check_edges(list(input_edges), "input_edges")
    _check_edges(list(output_edges), "output_edges")
    engine = engine_for(gpu) if engine is None else engine
    inputs = [representative_size(a, b, representative) for a, b in pairwise(input_edges)]
    outputs = [representative_size(a, b, representative) for a, b in pairwise(output_edges)]
    return [
        [
            round_significant(
                request_throughput(gpu, model, i, o, tpot_slo_seconds, engine=engine),
                significant_digits,
            )
            for o in outputs
        ]
        for i in inputs
    ]


def _camel_keys(fields: dict[str, Any]) -> dict[str, Any]:
    """`cost_per_hour` -> `costPerHour`, as everywhere else in the manifests."""
    camel = {}
    for key, value in fields.items():
        head, *rest = key.split("_")
        camel[head + "".join(part.title() for part in rest)] = value
    return camel


def describe_inputs(
    gpu: GpuSpec,
    model: ModelSpec,
    input_edges: list[int],
    output_edges: list[int],
    tpot_slo_seconds: float,
    *,
    engine: EngineSpec | None = None,
    representative: RepresentativeRule = "mean",
    significant_digits: int = DEFAULT_SIGNIFICANT_DIGITS,
) -> dict[str, Any]:
    """Every input of an `estimate_throughput` call, as plain data: an estimated profile's label.

    Same arguments as `estimate_throughput`; re-running it with these values reproduces the matrix.
    """
    engine = engine_for(gpu) if engine is None else engine
    return {
        "method": "melange.tools.perfmodel roofline estimate (continuous batching, chunked prefill)",
        "schemaVersion": ESTIMATE_SCHEMA_VERSION,
        "gpu": _camel_keys(asdict(gpu)),
        "model": _camel_keys(asdict(model)),
        "engine": _camel_keys(asdict(engine)),
        "tpotSloSeconds": tpot_slo_seconds,
        "buckets": {"inputTokens": list(input_edges), "outputTokens": list(output_edges)},
        "representativeSize": representative,
        "representativeSizeRule": {
            "mean": "(high - low) / ln(high / low): the mean of lengths spread evenly in log space",
            "geometric": "sqrt(low * high) of each bucket's edges",
            "arithmetic": "(low + high) / 2 of each bucket's edges",
            "upper": "the bucket's upper edge",
        }[representative],
        "averageContext": "input + output / 2 tokens",
        "significantDigits": significant_digits,
    }


def slug(name: str) -> str:
    """Lower-case form used in profile names: `A100-80GB` -> `a100-80gb`."""
    return name.lower().replace(" ", "-").replace("/", "-")


def profile_name(model: str, gpu: str, tpot_slo_seconds: float) -> str:
    """E.g. `llama-3.1-8b/a100-80gb/tpot-120ms`."""
    return f"{slug(model)}/{slug(gpu)}/tpot-{round(tpot_slo_seconds * 1000)}ms"


def build_profile(
    gpu: GpuSpec,
    model: ModelSpec,
    tpot_slo_seconds: float,
    input_edges: list[int] | None = None,
    output_edges: list[int] | None = None,
    *,
    engine: EngineSpec | None = None,
    representative: RepresentativeRule = "mean",
    significant_digits: int = DEFAULT_SIGNIFICANT_DIGITS,
) -> dict[str, Any]:
    """A profile: a `spec.gpus[]` entry (`name`, `costPerHour`, `throughput`) plus its metadata."""
    ins = list(DEFAULT_INPUT_EDGES if input_edges is None else input_edges)
    outs = list(DEFAULT_OUTPUT_EDGES if output_edges is None else output_edges)
    engine = engine_for(gpu) if engine is None else engine
    options: dict[str, Any] = {
        "engine": engine,
        "representative": representative,
        "significant_digits": significant_digits,
    }
    return {
        "profile": profile_name(model.name, gpu.name, tpot_slo_seconds),
        "name": gpu.name,
        "costPerHour": gpu.cost_per_hour,
        "model": model.name,
        "tpotSeconds": tpot_slo_seconds,
        "buckets": {"inputTokens": ins, "outputTokens": outs},
        "source": "estimate",
        "throughput": estimate_throughput(gpu, model, ins, outs, tpot_slo_seconds, **options),
        "estimate": describe_inputs(gpu, model, ins, outs, tpot_slo_seconds, **options),
    }


def generate_shipped_profiles() -> dict[str, dict[str, Any]]:
    """The profile library shipped in `melange/profiles/data`, by profile name (deterministic):
    every model of `SHIPPED_INSTANCES` on its instance of each GPU type, at each shipped SLO."""
    profiles = [
        build_profile(gpu_instance(DATASHEETS[gpu], gpus), MODELS[model], tpot)
        for model, instances in SHIPPED_INSTANCES.items()
        for gpu, gpus in instances.items()
        for tpot in SHIPPED_TPOT_SECONDS
    ]
    return {p["profile"]: p for p in profiles}
