"""Step-time profiles: how long one engine step takes, as a function of what it computes.

vLLM v1 runs one forward pass per engine step over every scheduled token: prompt chunks
(prefill) and one token per running sequence (decode). Its time is modelled as linear in five
features of the step (the model Llumnix and Dynamo's mocker use, with the prefill's attention
written as the pairs of tokens it attends over, so that chunked prefill of a long prompt costs
what it costs)::

    t = base_s
        + prefill_token_s     * prefill_tokens        # new prompt tokens computed
        + attention_pair_s    * prefill_attention     # chunk x (context before + chunk / 2)
        + decode_seq_s        * decode_seqs           # sequences producing one token
        + decode_context_s    * decode_context_tokens # tokens those sequences attend over

A profile also carries what bounds an instance (KV blocks, batch limits) and moves KV (bytes
per token, link bandwidth and latency). Profiles are JSON; ``source`` says whether one was
measured (``pdserve profile``) or derived from published hardware figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StepCoefficients(BaseModel):
    """Seconds per unit of each step feature (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_s: float = Field(ge=0, description="fixed cost of a step (scheduling, launch)")
    prefill_token_s: float = Field(ge=0, description="per prompt token computed")
    attention_pair_s: float = Field(ge=0, description="per (new token, attended token) pair")
    decode_seq_s: float = Field(ge=0, description="per decoding sequence")
    decode_context_s: float = Field(ge=0, description="per context token a decode attends over")


class StepProfile(BaseModel):
    """One serving setup (model x hardware x engine limits) as the simulator sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: Literal["measured", "derived"] = Field(
        description="measured on a real instance (pdserve profile) or derived, not measured"
    )
    description: str = ""
    model: str = ""
    hardware: str = ""
    coefficients: StepCoefficients
    block_size: int = Field(16, ge=1)
    num_blocks: int = Field(ge=1, description="KV cache blocks of one instance")
    kv_bytes_per_token: int = Field(ge=1, description="KV bytes of one token, all layers")
    link_bandwidth_bytes_per_s: float = Field(gt=0, description="KV transfer bandwidth")
    link_latency_s: float = Field(0.0, ge=0, description="fixed cost of one KV transfer")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of a step")
    max_num_seqs: int = Field(256, ge=1, description="sequences running at once")
    max_model_len: int = Field(8192, ge=1)

    def step_seconds(self, step: StepWork) -> float:
        c = self.coefficients
        return (
            c.base_s
            + c.prefill_token_s * step.prefill_tokens
            + c.attention_pair_s * step.prefill_attention
            + c.decode_seq_s * step.decode_seqs
            + c.decode_context_s * step.decode_context_tokens
        )

    def transfer_seconds(self, tokens: int) -> float:
        """Time to pull ``tokens`` tokens of KV from one instance to another."""
        return (
            self.link_latency_s + tokens * self.kv_bytes_per_token / self.link_bandwidth_bytes_per_s
        )


@dataclass(frozen=True)
class StepWork:
    """What one engine step computes: the features of the step-time model."""

    prefill_tokens: int = 0
    prefill_attention: float = 0.0
    decode_seqs: int = 0
    decode_context_tokens: int = 0

    @staticmethod
    def chunk_attention(chunk: int, context_before: int) -> float:
        """Attention pairs of a prompt chunk of ``chunk`` tokens after ``context_before``."""
        return chunk * (context_before + chunk / 2)


def load_profile_file(path: str | Path) -> StepProfile:
    return StepProfile.model_validate_json(Path(path).read_text())


def save_profile(profile: StepProfile, path: str | Path) -> None:
    Path(path).write_text(profile.model_dump_json(indent=2) + "\n")
