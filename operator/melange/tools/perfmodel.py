"""First-order performance model: estimated throughput profiles for GPUs nobody has profiled yet.

Mélange needs, for every GPU type, the request rate one instance sustains for each request-size
bucket within the TPOT SLO. Measuring that takes a GPU and an afternoon per type; on day one users
have neither, so this module derives a profile from datasheet numbers with a roofline model of a
continuous-batching engine (vLLM-like, chunked prefill). It is an *estimate* (treat it as +-50%):
every profile built from it is labelled `source: estimate` and carries `describe_inputs(...)` so
it can be told apart from, and replaced by, a measured one.

The model, per bucket (all quantities are averages over a steady state):

* Representative request: input `I` and output `O` tokens chosen from the bucket edges
  (`representative_size`; geometric midpoint by default).
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
observation), with these numbers: tiny requests are compute- and host-bound, not bandwidth-bound.
The engine's batch cap and its host overheads (per step, per sequence, per request) are the same on
every GPU, so a faster card spends a growing share of each step on work its FLOP/s do not speed up,
and cost per request drifts towards following the hourly price: the L4 is cheapest on the
[1, 25) x [1, 25) bucket at 120 ms. Without the host terms this would be a pure roofline, which
ranks GPUs by FLOP/s per dollar on small requests and makes the L40S (whose datasheet FLOP/s per
dollar beats the L4's) tie or win there; vLLM's own profiling (most of a Llama-3-8B step on H100 was
CPU work before v0.6) says the host terms are real. Long requests are KV-cache bound: a 24 GB card
holds only a few 6k-token contexts next to 16 GB of Llama-3.1-8B weights and every step re-reads
them, so capacity and bandwidth per dollar decide and the A100-80GB wins (the H100 is faster but
costs twice as much and holds the same number of requests). At 40 ms the L4 serves nothing: just
streaming the weights takes ~71 ms per step. In between, at these prices, the L40S is often the
cheapest, which the Mélange paper (no L40S) could not show.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any, Literal, get_args

RepresentativeRule = Literal["geometric", "arithmetic", "upper"]
"""How a bucket `[lo, hi)` is reduced to one request size (see `representative_size`)."""

ESTIMATE_SCHEMA_VERSION = 1
"""Bump when the formulas change, so stored estimates can be told apart from newer ones."""


@dataclass(frozen=True)
class GpuSpec:
    """A GPU type: datasheet peaks, an hourly price, and the fraction of each peak an engine gets.

    `compute_efficiency` is the achieved fraction of dense BF16 FLOP/s (model FLOPs utilisation,
    ~0.5-0.6 for prefill-sized GEMMs in vLLM/TensorRT-LLM); `bandwidth_efficiency` the achieved
    fraction of memory bandwidth in decode (~0.7-0.8: weight streaming reaches ~85-90% of peak in
    microbenchmarks, attention over a paged KV cache less). Memory is the datasheet capacity read as
    10^9 bytes, slightly below the GiB the card really has; the engine's reserve is applied on top.
    """

    name: str
    cost_per_hour: float  # USD, on-demand, one GPU
    bf16_flops: float  # dense (no sparsity) BF16 tensor-core FLOP/s
    memory_bandwidth: float  # bytes/s
    memory_bytes: float
    compute_efficiency: float = 0.55
    bandwidth_efficiency: float = 0.75

    @property
    def effective_flops(self) -> float:
        return self.bf16_flops * self.compute_efficiency

    @property
    def effective_bandwidth(self) -> float:
        return self.memory_bandwidth * self.bandwidth_efficiency


# Datasheet figures: dense BF16 tensor FLOP/s, half the "with sparsity" number NVIDIA headlines.
# Prices are typical on-demand USD/h for one GPU; real prices vary by cloud, region and date, so
# override `cost_per_hour` (dataclasses.replace) with your own before trusting a cost comparison.
GPUS: dict[str, GpuSpec] = {
    gpu.name: gpu
    for gpu in (
        # NVIDIA L4 datasheet: BF16 tensor 242 TFLOPS with sparsity -> 121 dense; 24 GB GDDR6,
        # 300 GB/s. Price: GCP g2-standard-4 (1x L4), about $0.70/h.
        GpuSpec("L4", 0.70, 121e12, 300e9, 24e9),
        # AWS A10G: NVIDIA publishes no datasheet; 70 TFLOPS dense FP16/BF16 tensor is the commonly
        # quoted figure (the A10 datasheet says 125 dense / 250 sparse); 24 GB GDDR6, 600 GB/s.
        # Price: AWS g5.xlarge, $1.006/h.
        GpuSpec("A10G", 1.01, 70e12, 600e9, 24e9),
        # NVIDIA L40S datasheet: BF16 tensor 733 TFLOPS with sparsity -> 362.05 dense; 48 GB GDDR6,
        # 864 GB/s. Price: AWS g6e.xlarge, $1.861/h.
        GpuSpec("L40S", 1.86, 362.05e12, 864e9, 48e9),
        # NVIDIA A100 datasheet (80GB SXM): BF16 tensor 312 TFLOPS dense (624 sparse); 80 GB HBM2e,
        # 2,039 GB/s. Price: $3.67/h, the figure the Mélange reference implementation uses.
        GpuSpec("A100-80GB", 3.67, 312e12, 2039e9, 80e9, bandwidth_efficiency=0.8),
        # NVIDIA H100 SXM5 datasheet: BF16 tensor 1,979 TFLOPS with sparsity -> 989 dense; 80 GB
        # HBM3, 3.35 TB/s. Price: ~$7.5/h per GPU on the large clouds' 8-GPU on-demand instances.
        GpuSpec("H100", 7.52, 989e12, 3350e9, 80e9, bandwidth_efficiency=0.8),
    )
}


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
    )
}


@dataclass(frozen=True)
class EngineSpec:
    """The serving engine's limits and overheads, the same on every GPU (vLLM defaults by default).

    `max_batch_size` is vLLM's default `max_num_seqs`; `memory_reserve_fraction` its default
    `gpu_memory_utilization=0.9` (the rest holds activations, CUDA graphs and fragmentation).
    The overheads are host-side work that is not GPU time: per step (scheduling, input preparation,
    launching the step), per running sequence per step (sampling bookkeeping, detokenising, stop
    checks, streaming) and per request (HTTP, tokenising, admission and teardown; 0.5 ms is the
    order at which one Python API server saturates, 1-2k requests/s). vLLM's profiling of Llama-3-8B
    on one H100 found such CPU work took most of each ~5 ms GPU step before v0.6; newer engines
    overlap part of it, so these defaults are deliberately on the conservative side.
    """

    max_batch_size: int = 256
    step_overhead_seconds: float = 0.002
    per_sequence_overhead_seconds: float = 20e-6
    per_request_overhead_seconds: float = 0.5e-3
    memory_reserve_fraction: float = 0.10


DEFAULT_ENGINE = EngineSpec()
DEFAULT_INPUT_EDGES: tuple[int, ...] = (1, 25, 100, 250, 500, 1000, 2000, 4000, 8000)
DEFAULT_OUTPUT_EDGES: tuple[int, ...] = (1, 25, 100, 250, 500, 1000, 2000)
DEFAULT_SIGNIFICANT_DIGITS = 4
SHIPPED_MODEL = "llama-3.1-8b"
SHIPPED_GPUS: tuple[str, ...] = ("L4", "A10G", "L40S", "A100-80GB", "H100")
SHIPPED_TPOT_SECONDS: tuple[float, ...] = (0.040, 0.120)


def representative_size(low: float, high: float, rule: RepresentativeRule = "geometric") -> float:
    """The one request length that stands for bucket `[low, high)`.

    `geometric` (default): sqrt(low * high). The default edges grow roughly geometrically and real
    length distributions are close to log-normal, so within a bucket lengths are spread evenly in
    log space and the geometric midpoint is their median; the arithmetic midpoint would let the
    upper edge dominate (13 instead of 5 tokens for the bucket [1, 25)).
    `arithmetic`: (low + high) / 2. `upper`: high, the bucket's worst case (a conservative profile).
    """
    if not 0 < low < high:
        raise ValueError(f"bucket edges must satisfy 0 < low < high, got [{low}, {high})")
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
    engine: EngineSpec = DEFAULT_ENGINE,
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
    engine: EngineSpec = DEFAULT_ENGINE,
    representative: RepresentativeRule = "geometric",
    significant_digits: int = DEFAULT_SIGNIFICANT_DIGITS,
) -> list[list[float]]:
    """The throughput matrix (rows: input buckets, columns: output buckets) as `spec.gpus[]` wants.

    `input_edges`/`output_edges` are bucket edges as in the custom resource's `spec.buckets`
    (n + 1 edges -> n buckets). Values are req/s rounded to `significant_digits`, 0 = cannot serve.
    """
    _check_edges(list(input_edges), "input_edges")
    _check_edges(list(output_edges), "output_edges")
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
    engine: EngineSpec = DEFAULT_ENGINE,
    representative: RepresentativeRule = "geometric",
    significant_digits: int = DEFAULT_SIGNIFICANT_DIGITS,
) -> dict[str, Any]:
    """Every input of an `estimate_throughput` call, as plain data: an estimated profile's label.

    Same arguments as `estimate_throughput`; re-running it with these values reproduces the matrix.
    """
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
    engine: EngineSpec = DEFAULT_ENGINE,
    representative: RepresentativeRule = "geometric",
    significant_digits: int = DEFAULT_SIGNIFICANT_DIGITS,
) -> dict[str, Any]:
    """A profile: a `spec.gpus[]` entry (`name`, `costPerHour`, `throughput`) plus its metadata."""
    ins = list(DEFAULT_INPUT_EDGES if input_edges is None else input_edges)
    outs = list(DEFAULT_OUTPUT_EDGES if output_edges is None else output_edges)
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
    """The profile library shipped in `melange/profiles/data`, by profile name (deterministic)."""
    model = MODELS[SHIPPED_MODEL]
    profiles = [
        build_profile(GPUS[gpu], model, tpot)
        for gpu in SHIPPED_GPUS
        for tpot in SHIPPED_TPOT_SECONDS
    ]
    return {p["profile"]: p for p in profiles}
