"""Behavioural detectors: online, bounded state, time passed in. Pure; stdlib, pydantic, scopes.

The mediation pipeline feeds one call at a time. Before forwarding, `precheck(state,
observation, now, rules)` runs every detector and returns the new state with a `Verdict`; a
verdict that ``blocks`` stops the call (reason ``flow-blocked`` or ``anomaly-blocked``), and
its ``action`` says what else the shell must do (revoke the token or the task, quarantine the
agent). After forwarding, `observe_result` takes in the result (size, watched values). The
shell tells the engine when a task closes (`close_task`). `DetectorBook` keeps the state of
every agent, task and token in bounded maps for a single process.

Modules, one per detector:
    model     Observation, ResultObservation, Signal, Verdict, Response, DetectorId, declarations
    config    DetectorsConfig: the ``[detectors]`` section of broker.toml
    denials   denial bursts and probing (near-miss retries of refused calls)
    rate      rate spikes over the agent's EWMA baseline, absolute cap
    profile   off-profile tools per (agent, purpose category); first use of high-risk tools
    flow      the lethal trifecta and secret echo (split exfiltration included)
    secrets   watched values as chunks of their verbatim, hex and base64 forms
    loops     repeated identical calls; bytes read per task against a budget
    misuse    one token from several clients; use after the task closed
    engine    precheck / observe_result / close_task and the response of each signal
    book      DetectorBook: LRU-bounded keeper of the state slices
"""

from broker.core.detectors.book import DetectorBook
from broker.core.detectors.config import (
    DenialsConfig,
    DetectorGroup,
    DetectorsConfig,
    FlowConfig,
    LoopsConfig,
    ProfileConfig,
    RateConfig,
    TokensConfig,
)
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
from broker.core.detectors.model import (
    Declarations,
    DetectorId,
    Flow,
    Observation,
    Response,
    ResultObservation,
    Severity,
    Signal,
    Verdict,
    declarations,
    tool_key,
)
from broker.core.detectors.profile import purpose_category

__all__ = [
    "AgentState",
    "Declarations",
    "DenialsConfig",
    "DetectorBook",
    "DetectorGroup",
    "DetectorId",
    "DetectorState",
    "DetectorsConfig",
    "Flow",
    "FlowConfig",
    "LoopsConfig",
    "Observation",
    "ProfileConfig",
    "RateConfig",
    "Response",
    "ResultObservation",
    "Rules",
    "Severity",
    "Signal",
    "TaskState",
    "TokenState",
    "TokensConfig",
    "Verdict",
    "close_task",
    "declarations",
    "observe_result",
    "precheck",
    "purpose_category",
    "tool_key",
]
