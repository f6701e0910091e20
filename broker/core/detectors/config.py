"""``[detectors]``: thresholds, responses and shadow switches. Pure; pydantic and stdlib only.

Mounted in `BrokerConfig` as ``detectors``. Every group has ``enabled``, ``shadow`` (decide and
record what it would do, but act as ``record``) and ``cap_after_untrusted``: a signal raised in a
task that has taken in ``untrusted`` content responds at most with ``untrusted_max_response``
(default ``block-call``), so planted content cannot cheaply get a victim agent quarantined.
Token misuse is not content-driven, so its group is not capped by default.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.core.detectors.model import Response
from scopes.globs import is_valid_glob

__all__ = [
    "DenialsConfig",
    "DetectorGroup",
    "DetectorsConfig",
    "FlowConfig",
    "LoopsConfig",
    "ProfileConfig",
    "RateConfig",
    "TokensConfig",
]

_Seconds = Annotated[float, Field(gt=0, le=86400)]
_Count = Annotated[int, Field(ge=1, le=100_000)]


class DetectorGroup(BaseModel):
    """Settings every detector group has."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    shadow: bool = False
    cap_after_untrusted: bool = True


class DenialsConfig(DetectorGroup):
    """Denial bursts, and retries that mutate a refused call a little (probing)."""

    window_seconds: _Seconds = 60.0
    burst: Annotated[int, Field(ge=2, le=1000)] = 10
    """Policy denials within the window that make a burst."""
    burst_response: Response = Response.QUARANTINE_AGENT
    mutation_retries: Annotated[int, Field(ge=1, le=100)] = 3
    """Near-miss variants of a refused call (same tool) within the window that make probing."""
    mutation_similarity: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """Dice coefficient over character trigrams of the canonical arguments."""
    probing_response: Response = Response.QUARANTINE_AGENT


class RateConfig(DetectorGroup):
    """Calls per minute against the agent's own EWMA baseline, and an absolute cap."""

    ewma_alpha: Annotated[float, Field(gt=0, le=1)] = 0.3
    spike_factor: Annotated[float, Field(ge=1)] = 8.0
    spike_floor_per_minute: _Count = 60
    """No spike below this rate, whatever the baseline; a new agent is held to it."""
    spike_response: Response = Response.BLOCK_CALL
    cap_per_minute: _Count = 300
    cap_response: Response = Response.REVOKE_TOKEN


class ProfileConfig(DetectorGroup):
    """Tools off the agent's profile for this kind of task; first use of a high-risk tool."""

    min_calls: _Count = 20
    """Calls an (agent, category) profile, or the agent as a whole, needs before it is trusted."""
    off_profile_response: Response = Response.RECORD
    high_risk_tools: tuple[str, ...] = ()
    """``connector/tool`` globs of tools whose first use by an experienced agent is held."""
    egress_is_high_risk: bool = True
    high_risk_response: Response = Response.BLOCK_CALL
    max_categories: Annotated[int, Field(ge=1, le=1000)] = 16
    max_tools: Annotated[int, Field(ge=1, le=10_000)] = 256

    @field_validator("high_risk_tools")
    @classmethod
    def _globs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [p for p in v if not is_valid_glob(p)]
        if bad:
            raise ValueError(f"expected connector/tool globs of [A-Za-z0-9_./*?-], got {bad}")
        return v


class FlowConfig(DetectorGroup):
    """The lethal trifecta, and secrets read earlier echoed in egress arguments."""

    trifecta_response: Response = Response.BLOCK_CALL
    secret_echo_response: Response = Response.QUARANTINE_AGENT
    egress_tools: tuple[str, ...] = ()
    """Extra ``connector/tool`` globs treated as egress whatever their scope's labels."""
    max_secrets: Annotated[int, Field(ge=1, le=256)] = 16
    """Watched values per task; the oldest are dropped first."""
    min_secret_chars: Annotated[int, Field(ge=8, le=1024)] = 10
    max_secret_chars: Annotated[int, Field(ge=8, le=1024)] = 64
    """Longer values are watched by their first ``max_secret_chars`` characters."""
    split_window_calls: Annotated[int, Field(ge=1, le=256)] = 16
    """Egress calls of a task whose matches add up (split exfiltration)."""
    match_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Share of a value's encoded form that must have left for a signal."""

    @model_validator(mode="after")
    def _lengths(self) -> FlowConfig:
        if self.min_secret_chars > self.max_secret_chars:
            raise ValueError("min_secret_chars must not exceed max_secret_chars")
        return self

    @field_validator("egress_tools")
    @classmethod
    def _globs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [p for p in v if not is_valid_glob(p)]
        if bad:
            raise ValueError(f"expected connector/tool globs of [A-Za-z0-9_./*?-], got {bad}")
        return v


class LoopsConfig(DetectorGroup):
    """The same canonical call over and over; bytes read per task beyond a budget."""

    window_seconds: _Seconds = 120.0
    max_repeats: Annotated[int, Field(ge=2, le=10_000)] = 12
    """Identical calls (tool and canonical arguments) within the window that make a loop."""
    recent_calls: Annotated[int, Field(ge=2, le=10_000)] = 64
    """Calls remembered per task for the repeat count."""
    repeat_response: Response = Response.BLOCK_CALL
    read_budget_bytes: Annotated[int, Field(ge=1)] = 64 * 1024 * 1024
    budget_response: Response = Response.BLOCK_CALL


class TokensConfig(DetectorGroup):
    """One token from several clients; a token used after its task was closed."""

    cap_after_untrusted: bool = False
    shared_response: Response = Response.REVOKE_TOKEN
    closed_task_response: Response = Response.REVOKE_TASK


class DetectorsConfig(BaseModel):
    """``[detectors]``: behavioural detection and the automatic responses."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    shadow: bool = False
    """Every detector in shadow mode, whatever its group says."""
    untrusted_max_response: Response = Response.BLOCK_CALL
    max_agents: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    max_tasks: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    max_tokens: Annotated[int, Field(ge=1, le=10_000_000)] = 20_000
    denials: DenialsConfig = DenialsConfig()
    rate: RateConfig = RateConfig()
    profile: ProfileConfig = ProfileConfig()
    flow: FlowConfig = FlowConfig()
    loops: LoopsConfig = LoopsConfig()
    tokens: TokensConfig = TokensConfig()
