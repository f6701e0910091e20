"""Loops and cost: the same canonical call repeated, and bytes read per task. Pure.

A call is identified by a digest of (connector, tool, canonical arguments). The task remembers
its last ``recent_calls`` calls; a call seen ``max_repeats`` times within the window (this one
included) is a loop. Result sizes add up per task; once past the budget, every further call of
the task is held (the crossing result itself has already been forwarded, so it is signalled
after the fact).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from broker.core.detectors.config import LoopsConfig
from broker.core.detectors.model import DetectorId, Signal

__all__ = ["LoopState", "call_digest", "check_budget", "observe_repeat", "observe_bytes"]


@dataclass(frozen=True, slots=True)
class LoopState:
    recent: tuple[tuple[bytes, float, str], ...] = ()
    bytes_read: int = 0
    budget_ref: str | None = None
    """The result that took the task over its budget."""


def call_digest(key: str, text: str) -> bytes:
    return hashlib.blake2b(
        f"{key}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=12
    ).digest()


def observe_repeat(
    state: LoopState, digest: bytes, ref: str, t: float, cfg: LoopsConfig
) -> tuple[LoopState, list[Signal]]:
    """Remember this call; signal when it repeats ``max_repeats`` times in the window."""
    recent = state.recent[max(0, len(state.recent) - cfg.recent_calls + 1) :]
    state = LoopState((*recent, (digest, t, ref)), state.bytes_read, state.budget_ref)
    # Cheap pre-count over the digests alone; the windowed count only when it could matter.
    if sum(1 for entry in recent if entry[0] == digest) + 1 < cfg.max_repeats:
        return state, []
    cutoff = t - cfg.window_seconds
    same = [r for d, at, r in recent if d == digest and at >= cutoff]
    if len(same) + 1 < cfg.max_repeats:
        return state, []
    signal = Signal(
        DetectorId.REPEATED_CALL,
        (("repeats", len(same) + 1), ("window_seconds", cfg.window_seconds)),
        (*same[-7:], ref),
    )
    return state, [signal]


def check_budget(state: LoopState, ref: str, cfg: LoopsConfig) -> list[Signal]:
    """A call in a task already over its read budget."""
    if state.bytes_read <= cfg.read_budget_bytes:
        return []
    values = (("bytes_read", state.bytes_read), ("budget_bytes", cfg.read_budget_bytes))
    return [Signal(DetectorId.READ_BUDGET, values, (state.budget_ref or ref, ref))]


def observe_bytes(
    state: LoopState, size: int, ref: str, cfg: LoopsConfig
) -> tuple[LoopState, list[Signal]]:
    """Add a result's size; signal when it takes the task over its budget."""
    total = state.bytes_read + max(0, size)
    crossed = state.bytes_read <= cfg.read_budget_bytes < total
    state = LoopState(state.recent, total, ref if crossed else state.budget_ref)
    if not crossed:
        return state, []
    values = (("bytes_read", total), ("budget_bytes", cfg.read_budget_bytes))
    return state, [Signal(DetectorId.READ_BUDGET, values, (ref,))]
