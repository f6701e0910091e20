"""A bounded in-memory keeper of detector state: explicit mutation, no I/O, no clock.

`DetectorBook` keeps the agent, task and token slices in least-recently-used maps capped by
``max_agents``, ``max_tasks`` and ``max_tokens``, and drives the pure engine. An evicted slice
starts over (a gap the caps make costly to exploit: every task or token needs a minted token).
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime
from typing import Generic, TypeVar

from broker.core.detectors.config import DetectorsConfig
from broker.core.detectors.engine import (
    AgentState,
    DetectorState,
    Rules,
    TaskState,
    close_task,
    observe_result,
    precheck,
)
from broker.core.detectors.misuse import TokenState
from broker.core.detectors.model import Observation, ResultObservation, Verdict

__all__ = ["DetectorBook", "Lru"]

V = TypeVar("V")


class Lru(Generic[V]):
    """A map of at most ``cap`` entries; reading or writing an entry makes it the newest."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._items: OrderedDict[str, V] = OrderedDict()

    def get(self, key: str) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.cap:
            self._items.popitem(last=False)

    def pop(self, key: str) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class DetectorBook:
    """Detector state for every live agent, task and token, bounded; one per broker process."""

    def __init__(self, config: DetectorsConfig) -> None:
        self.rules = Rules(config)
        self.agents: Lru[AgentState] = Lru(config.max_agents)
        self.tasks: Lru[TaskState] = Lru(config.max_tasks)
        self.tokens: Lru[TokenState] = Lru(config.max_tokens)

    def _slices(self, agent_id: str, task_id: str, jti: str) -> DetectorState:
        return DetectorState(
            self.agents.get(agent_id) or AgentState(),
            self.tasks.get(task_id) or TaskState(),
            self.tokens.get(jti) or TokenState(),
        )

    def precheck(self, obs: Observation, now: datetime) -> Verdict:
        """Run the detectors on a call before forwarding; store the new state."""
        state, verdict = precheck(
            self._slices(obs.agent_id, obs.task_id, obs.jti), obs, now, self.rules
        )
        self.agents.put(obs.agent_id, state.agent)
        self.tasks.put(obs.task_id, state.task)
        self.tokens.put(obs.jti, state.token)
        return verdict

    def observe_result(self, res: ResultObservation, now: datetime) -> Verdict:
        """Take in a forwarded call's result; store the new task state."""
        task = self.tasks.get(res.task_id) or TaskState()
        state, verdict = observe_result(DetectorState(task=task), res, now, self.rules)
        self.tasks.put(res.task_id, state.task)
        return verdict

    def close_task(self, task_id: str, ref: str) -> None:
        """The shell closed ``task_id`` (``ref``: the closing event); later use is signalled."""
        self.tasks.put(task_id, close_task(self.tasks.get(task_id) or TaskState(), ref))

    def forget_token(self, jti: str) -> None:
        """Drop a token's state (it expired or was revoked)."""
        self.tokens.pop(jti)
