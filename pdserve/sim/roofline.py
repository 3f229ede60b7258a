"""Built-in step-time profiles for GPU setups: derived, not measured, from published figures.

No GPU was measured for these. Each profile is a roofline of one model on one GPU type, from
the hardware's datasheet (peak dense BF16/FP16 tensor FLOP/s, HBM bandwidth, memory) and the
model's published shapes, turned into the five coefficients of ``pdserve.sim.profile``:

* ``base_s`` = ``STEP_OVERHEAD_S`` + weight bytes / bandwidth: every step streams all weights
  from HBM once, however few tokens it computes;
* ``prefill_token_s`` = ``decode_seq_s`` = 2 x parameters / compute: the FLOPs of one token
  through every matrix (an estimate of 2 FLOPs per parameter per token, which counts the
  embedding and LM head too, a ~2-4% overestimate for these models);
* ``attention_pair_s`` = 4 x layers x query heads x head dim / compute: Q·K and P·V for one
  (query token, attended token) pair;
* ``decode_context_s`` = KV bytes per token / bandwidth + attention FLOPs per pair / compute:
  a decoding sequence reads its whole KV cache every step;

with compute = peak FLOP/s x ``COMPUTE_EFFICIENCY`` x TP and bandwidth = HBM bandwidth x
``MEMORY_EFFICIENCY`` x TP. The terms are added, where a roofline takes the larger of compute
and memory time: the linear model cannot take a maximum. The sum overestimates by at most the
smaller term (a 512-token prefill on the A10 counts its 28 ms weight read on top of 92 ms of
compute), the price of one model for every step mix.

The efficiency factors are assumptions, not fits: large BF16 GEMMs reach 90-96% of peak
(e.g. 142 of 148 TFLOPS measured on an H20 at 10240^3), but a whole forward pass with small
GEMMs, attention, norms and sampling reaches ~50-60% of peak in vLLM's prefill (model FLOPs
utilization), so 0.6; decode kernels stream weights and KV at ~75-85% of peak HBM bandwidth, so
0.8. ``STEP_OVERHEAD_S`` (1 ms) is vLLM v1's per-step CPU work (scheduling, input preparation,
sampling, output processing) left visible with CUDA graphs. Derived profiles have no
``request_overhead_s`` (HTTP and detokenization): they model the engine only.

KV capacity is vLLM's: ``GPU_MEMORY_UTILIZATION`` (0.9, vLLM's default) of the memory the
driver reports (nvidia-smi's total), minus the weights and ``ACTIVATION_RESERVE_BYTES`` (2 GiB:
the peak activations of vLLM's profiling run, CUDA graphs and non-torch allocations, 1-3 GiB for
these models), divided by the bytes of a block (block size x KV bytes per token, KV bytes per
token = 2 (K and V) x layers x KV heads x head dim x dtype bytes), less vLLM's null block.
``max_num_batched_tokens`` and ``max_num_seqs`` are vLLM 0.32's API-server defaults for the
GPU's memory (2048 / 256 below 70 GiB, 8192 / 1024 for H100/H20-class GPUs:
``EngineArgs.get_batch_defaults``).

Every figure used is recorded in the profile's ``inputs``. ``pdserve/sim/profiles/*.json`` are
written from here (``python -m pdserve.sim.roofline``) and a unit test checks that they match.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pdserve.sim.profile import PROFILES_DIR, StepCoefficients, StepProfile, save_profile

COMPUTE_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.8
STEP_OVERHEAD_S = 0.001
GPU_MEMORY_UTILIZATION = 0.9
ACTIVATION_RESERVE_BYTES = 2 * 2**30
LINK_EFFICIENCY = 0.8  # of a link's line rate that a bulk transfer gets
MIB = 2**20


@dataclass(frozen=True)
class Gpu:
    """Datasheet figures of one GPU."""

    name: str
    peak_flops: float  # dense BF16/FP16 tensor FLOP/s (no sparsity)
    hbm_bytes_per_s: float
    memory_bytes: int  # as the driver reports it (nvidia-smi's total)
    source: str


@dataclass(frozen=True)
class Model:
    """Published shapes of one model (its Hugging Face config.json and model card)."""

    name: str
    params: float
    layers: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    max_model_len: int
    source: str
    dtype_bytes: int = 2  # BF16/FP16 weights and KV cache

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def attention_flops_per_pair(self) -> float:
        return 4.0 * self.layers * self.heads * self.head_dim


@dataclass(frozen=True)
class Setup:
    """One serving setup: a model on ``tensor_parallel`` GPUs, and the link between instances."""

    name: str
    model: Model
    gpu: Gpu
    link_bits_per_s: float
    link_source: str
    tensor_parallel: int = 1
    link_latency_s: float = 0.001
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    notes: str = ""


A10 = Gpu(
    "NVIDIA A10 (24 GB GDDR6)",
    peak_flops=125e12,
    hbm_bytes_per_s=600e9,
    memory_bytes=23_028 * MIB,
    source="NVIDIA A10 datasheet: 125 TFLOPS FP16/BF16 tensor dense, 600 GB/s, 24 GB",
)
H20 = Gpu(
    "NVIDIA H20 (96 GB HBM3)",
    peak_flops=148e12,
    hbm_bytes_per_s=4.0e12,
    memory_bytes=97_871 * MIB,
    source="NVIDIA H20 product brief: 148 TFLOPS BF16 tensor dense, 4.0 TB/s HBM3, 96 GB",
)
H100 = Gpu(
    "NVIDIA H100 SXM (80 GB HBM3)",
    peak_flops=989e12,
    hbm_bytes_per_s=3.35e12,
    memory_bytes=81_559 * MIB,
    source="NVIDIA H100 datasheet (SXM5): 989 TFLOPS BF16 tensor dense, 3.35 TB/s, 80 GB",
)

LLAMA_2_7B = Model(
    "meta-llama/Llama-2-7b-hf",
    params=6.74e9,
    layers=32,
    heads=32,
    kv_heads=32,
    head_dim=128,
    max_model_len=4096,
    source="config.json: 32 layers, hidden 4096, 32 heads, no GQA (32 KV heads), 4096 positions",
)
QWEN3_32B = Model(
    "Qwen/Qwen3-32B",
    params=32.8e9,
    layers=64,
    heads=64,
    kv_heads=8,
    head_dim=128,
    max_model_len=40960,
    source="model card and config.json: 32.8B parameters, 64 layers, 64 query / 8 KV heads, "
    "head dim 128, 40960 positions",
)
LLAMA_3_1_8B = Model(
    "meta-llama/Llama-3.1-8B-Instruct",
    params=8.03e9,
    layers=32,
    heads=32,
    kv_heads=8,
    head_dim=128,
    max_model_len=131072,
    source="config.json: 8.03B parameters, 32 layers, 32 query / 8 KV heads, head dim 128, "
    "131072 positions",
)

SETUPS: tuple[Setup, ...] = (
    Setup(
        "llama-2-7b-a10",
        LLAMA_2_7B,
        A10,
        link_bits_per_s=64e9,
        link_source="the Llumnix paper's testbed (Sun et al., OSDI 2024): 4 VMs of 4 A10 GPUs, "
        "one 7B instance per GPU (16 instances), 64 Gb/s between VMs; the slower, inter-VM "
        "link is used for every transfer",
        notes="Llumnix serves LLaMA-7B, whose shapes Llama-2-7B shares (Llama-2 has 4096 "
        "positions, LLaMA 2048)",
    ),
    Setup(
        "qwen3-32b-h20",
        QWEN3_32B,
        H20,
        link_bits_per_s=400e9,
        link_source="assumed, not from the Llumnix v1 description: instances on different "
        "hosts, one 400 Gb/s RDMA NIC per GPU (the usual 8-GPU H20 server); NVLink inside a "
        "host would be ~10x faster",
        max_num_batched_tokens=8192,
        max_num_seqs=1024,
        notes="TP = 1 assumed (one H20 per instance, 8 instances per 8-GPU host): the 65.6 GB of "
        "BF16 weights fit in 96 GB and leave ~25 GB of KV cache",
    ),
    Setup(
        "llama-3.1-8b-h100",
        LLAMA_3_1_8B,
        H100,
        link_bits_per_s=400e9,
        link_source="one 400 Gb/s ConnectX-7 (NDR) per GPU, as in a DGX H100; instances on "
        "different hosts",
        max_num_batched_tokens=8192,
        max_num_seqs=1024,
        notes="TP = 1",
    ),
)


def num_blocks(setup: Setup) -> int:
    """Usable KV blocks: what is left of 90% of the memory after weights and activations."""
    tp = setup.tensor_parallel
    free = (
        GPU_MEMORY_UTILIZATION * setup.gpu.memory_bytes * tp
        - setup.model.weight_bytes
        - ACTIVATION_RESERVE_BYTES * tp
    )
    # Less the null block vLLM keeps: the blocks requests can use, as load reports count them.
    blocks = math.floor(free / (setup.block_size * setup.model.kv_bytes_per_token)) - 1
    if blocks < 1:
        raise ValueError(f"{setup.name}: the weights leave no room for a KV cache")
    return blocks


def derive(setup: Setup) -> StepProfile:
    """The roofline profile of one setup (see the module docstring)."""
    model, gpu, tp = setup.model, setup.gpu, setup.tensor_parallel
    compute = gpu.peak_flops * COMPUTE_EFFICIENCY * tp
    bandwidth = gpu.hbm_bytes_per_s * MEMORY_EFFICIENCY * tp
    per_token = 2.0 * model.params / compute
    coefficients = StepCoefficients(
        base_s=STEP_OVERHEAD_S + model.weight_bytes / bandwidth,
        prefill_token_s=per_token,
        attention_pair_s=model.attention_flops_per_pair / compute,
        decode_seq_s=per_token,
        decode_context_s=model.kv_bytes_per_token / bandwidth
        + model.attention_flops_per_pair / compute,
    )
    link = setup.link_bits_per_s / 8 * LINK_EFFICIENCY
    return StepProfile(
        name=setup.name,
        source="derived",
        description=f"derived, not measured: a roofline of {model.name} on {tp} x {gpu.name} "
        f"from published figures (peak FLOP/s x {COMPUTE_EFFICIENCY}, HBM bandwidth x "
        f"{MEMORY_EFFICIENCY}, {STEP_OVERHEAD_S * 1000:g} ms per step; pdserve.sim.roofline). "
        f"{setup.notes}.",
        model=model.name,
        hardware=f"{tp} x {gpu.name}",
        coefficients=coefficients,
        block_size=setup.block_size,
        num_blocks=num_blocks(setup),
        kv_bytes_per_token=model.kv_bytes_per_token,
        link_bandwidth_bytes_per_s=link,
        link_latency_s=setup.link_latency_s,
        max_num_batched_tokens=setup.max_num_batched_tokens,
        max_num_seqs=setup.max_num_seqs,
        max_model_len=model.max_model_len,
        inputs={
            "gpu": gpu.source,
            "gpu_peak_flops": gpu.peak_flops,
            "gpu_hbm_bytes_per_s": gpu.hbm_bytes_per_s,
            "gpu_memory_bytes": gpu.memory_bytes,
            "model": model.source,
            "model_params": model.params,
            "model_layers": model.layers,
            "model_heads": model.heads,
            "model_kv_heads": model.kv_heads,
            "model_head_dim": model.head_dim,
            "dtype_bytes": model.dtype_bytes,
            "tensor_parallel": tp,
            "compute_efficiency": COMPUTE_EFFICIENCY,
            "memory_efficiency": MEMORY_EFFICIENCY,
            "step_overhead_s": STEP_OVERHEAD_S,
            "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
            "activation_reserve_bytes": ACTIVATION_RESERVE_BYTES,
            "link": setup.link_source,
            "link_bits_per_s": setup.link_bits_per_s,
            "link_efficiency": LINK_EFFICIENCY,
        },
    )


def derived_profiles() -> dict[str, StepProfile]:
    return {setup.name: derive(setup) for setup in SETUPS}


def write_profiles(directory: Path = PROFILES_DIR) -> list[Path]:
    """Writes every derived profile as ``directory/NAME.json``; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, profile in derived_profiles().items():
        paths.append(directory / f"{name}.json")
        save_profile(profile, paths[-1])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pdserve.sim.roofline [--output-dir DIR]``: (re)writes the built-ins."""
    parser = argparse.ArgumentParser(prog="python -m pdserve.sim.roofline", description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=PROFILES_DIR)
    args = parser.parse_args(argv)
    for path in write_profiles(args.output_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
