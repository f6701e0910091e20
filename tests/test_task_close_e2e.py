"""Closing a task, end to end: the agent says its work is over, and the task's tokens stop.

Through a served broker: the agent closes its task at ``/oauth/revoke`` (``close_task=true``),
a later call under the task is denied ``task-closed`` and recorded, the ``task-closed-use``
detector answers with its configured response, and the task is never reopened.
"""

from __future__ import annotations

import base64
from pathlib import Path

import anyio
import httpx2

from broker.core.detectors.model import DetectorId
from broker.core.recording import EventKind
from broker.core.revocation import RevocationKind
from tests.test_examples import ServedBroker
from tests.test_quarantine_e2e import detector_broker, mcp_session, mcp_status, text, token_request

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


async def close(
    broker: ServedBroker, token: str, client: tuple[str, str], **extra: str
) -> httpx2.Response:
    """``POST /oauth/revoke`` with ``close_task=true``, as the agent ``client``."""
    url = broker.url
    raw = base64.b64encode(f"{client[0]}:{client[1]}".encode()).decode()
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(
            url + "/oauth/revoke",
            data={"token": token, "close_task": "true", **extra},
            headers={"authorization": f"Basic {raw}"},
        )


async def task_token(broker: ServedBroker, client: tuple[str, str], task: str) -> str:
    """A client-credentials token for ``task``, as the agent ``client`` asks for it."""
    form = {"grant_type": "client_credentials", "scope": "slow:use", "task": task}
    response = await token_request(broker, client, form)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def exchange_form(token: str, actor: str) -> dict[str, str]:
    return {
        "grant_type": EXCHANGE,
        "subject_token": token,
        "subject_token_type": ACCESS,
        "actor": actor,
    }


async def test_a_closed_task_denies_and_records_every_later_call_and_is_then_revoked(
    tmp_path: Path,
) -> None:
    async with detector_broker(tmp_path) as broker:
        agent, secret = await broker.add_agent("worker", ["slow:use"])
        helper, helper_secret = await broker.add_agent("helper", ["slow:use"])
        first = await task_token(broker, (agent.id, secret), "report-7")
        renewed = await task_token(broker, (agent.id, secret), "report-7")
        other = await task_token(broker, (agent.id, secret), "report-8")
        exchanged = await token_request(broker, (agent.id, secret), exchange_form(first, helper.id))
        child = exchanged.json()["access_token"]

        with anyio.fail_after(30):
            async with mcp_session(broker, renewed) as session:
                before = await session.call_tool("slow__quick", {"text": "working"})
                assert not before.is_error
                # A delegated helper shares the task id but cannot end its parent's task.
                refused = await close(broker, child, (helper.id, helper_secret))
                assert refused.status_code == 400
                assert refused.json()["error"] == "unauthorized_client"

                done = await close(broker, first, (agent.id, secret))
                assert done.status_code == 200, done.text
                assert done.headers["cache-control"] == "no-store"

                # The open session, under another token of the same task: denied, named.
                after = await session.call_tool("slow__quick", {"text": "more"})
                assert after.is_error
                assert "task-closed" in text(after)
                assert "dec_" in text(after)

        # The detector's default response to the use was to revoke the task: every token of
        # it, the delegated one too, is now turned away at the door.
        for token in (first, renewed, child):
            assert await mcp_status(broker, token) == 401
        assert await mcp_status(broker, other) == 200
        revocations = await broker.services.store.revocations_since(0)
        assert [(r.kind, r.actor) for r in revocations] == [
            (RevocationKind.TASK_CLOSED, f"agent:{agent.id}"),
            (RevocationKind.TASK, "broker:detectors"),
        ]
        closing = revocations[0]
        assert DetectorId.TASK_CLOSED_USE.value in revocations[1].reason

        # The use is on the record, with the close it came after.
        sessions = await broker.services.store.list_sessions(agent_id=agent.id)
        events = [e for s in sessions for e in await broker.services.store.session_events(s.id)]
        signals = [e for e in events if e.kind == EventKind.DETECTOR_SIGNAL]
        assert signals, [e.kind for e in events]
        payload = signals[-1].payload
        assert DetectorId.TASK_CLOSED_USE.value in str(payload)
        assert f"revocation:{closing.seq}" in str(payload)

        # A closed task is never reopened.
        form = {"grant_type": "client_credentials", "scope": "slow:use", "task": "report-7"}
        reopened = await token_request(broker, (agent.id, secret), form)
        assert reopened.status_code == 400
        assert reopened.json()["error_description"] == "this task is closed: name a new task"


async def test_closing_needs_a_live_token_of_ones_own_task_and_happens_once(
    tmp_path: Path,
) -> None:
    async with detector_broker(tmp_path) as broker:
        agent, secret = await broker.add_agent("worker", ["slow:use"])
        stranger, s_secret = await broker.add_agent("stranger", ["slow:use"])
        token = await task_token(broker, (agent.id, secret), "t-1")

        foreign = await close(broker, token, (stranger.id, s_secret))
        assert foreign.json()["error"] == "unauthorized_client"
        junk = await close(broker, "not-a-token", (agent.id, secret))
        assert junk.status_code == 400
        assert junk.json()["error"] == "invalid_grant"
        assert "nothing closed" in junk.json()["error_description"]
        odd = await close(broker, token, (agent.id, secret), close_task="yes")
        assert odd.json()["error_description"] == "close_task must be true or false"
        assert await broker.services.store.revocations_since(0) == []

        assert (await close(broker, token, (agent.id, secret))).status_code == 200
        assert (await close(broker, token, (agent.id, secret))).status_code == 200
        closes = await broker.services.store.revocations_since(0)
        assert [(r.kind, r.subject) for r in closes] == [(RevocationKind.TASK_CLOSED, "t-1")]
        # Closed, not revoked: the token still opens a session, so its use can be recorded;
        # but it cannot be exchanged for a sub-agent's token.
        assert await mcp_status(broker, token) == 200
        exchanged = await token_request(
            broker, (agent.id, secret), exchange_form(token, stranger.id)
        )
        assert exchanged.status_code == 400
        assert exchanged.json()["error"] == "invalid_grant"
        with anyio.fail_after(20):
            async with mcp_session(broker, token) as session:
                listed = await session.list_tools()
        assert listed.tools == []
