"""Token misuse: one token from several clients, or a token used after its task closed. Pure.

The first client fingerprint a token is seen with is its holder; a call from any other is a
shared (stolen or leaked) token. Up to `MAX_FINGERPRINTS` are kept for the record. A task closed
by the shell stays closed: any later call under it is signalled.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.core.detectors.model import DetectorId, Observation, Signal

__all__ = ["MAX_FINGERPRINTS", "TokenState", "check_closed", "observe_token"]

MAX_FINGERPRINTS = 4


@dataclass(frozen=True, slots=True)
class TokenState:
    fingerprints: tuple[str, ...] = ()
    first_ref: str = ""


def observe_token(state: TokenState, obs: Observation) -> tuple[TokenState, list[Signal]]:
    """Note the client this call came from; signal when it is not the token's first."""
    fp = obs.client_fingerprint
    if not state.fingerprints:
        return TokenState((fp,), obs.decision_id), []
    if fp == state.fingerprints[0]:
        return state, []
    fps = state.fingerprints
    if fp not in fps and len(fps) < MAX_FINGERPRINTS:
        fps = (*fps, fp)
    signal = Signal(
        DetectorId.TOKEN_SHARED,
        (("clients", len(fps)), ("jti", obs.jti)),
        (state.first_ref, obs.decision_id),
    )
    return TokenState(fps, state.first_ref), [signal]


def check_closed(closed_ref: str | None, obs: Observation) -> list[Signal]:
    """A call under a task the shell has closed."""
    if closed_ref is None:
        return []
    return [
        Signal(DetectorId.TASK_CLOSED_USE, (("task", obs.task_id),), (closed_ref, obs.decision_id))
    ]
