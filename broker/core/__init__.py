"""The broker's pure core: values and rules, no I/O.

Rooms here are synchronous and deterministic. They import the standard library, pydantic,
pyjwt/cryptography (pure CPU) and `scopes`; never starlette, sqlalchemy, mcp, httpx/httpx2, anyio
or asyncio (``tests/test_layering.py`` enforces this). Time is passed in as ``now`` (an aware UTC
``datetime``), never read; random ids are passed in too. The shell (``broker/*.py``) fetches what
the core needs from the store and the network, calls the core, and acts on the answer.

Modules:
    decision    Reason (kebab-case vocabulary) and Decision (a value, not an exception)
    identity    Agent, AgentStatus, AdminRole: who may ask
    tokens      capability-token claims, minting and verification (one reason per failed check)
    revocation  the revocation view and the check every token use goes through
    delegation  RFC 8693 token exchange rules: a child never widens its parent
    policy      decide(request) -> Authorization; the first failing stage denies
    limits      rate limits as a pure token bucket
    pinning     tool-definition digests (rug-pull protection)
    recording   the shape of recorded events and their hash chain
    redaction   secrets replaced by keyed HMACs before anything is recorded
    detectors   behavioural detectors: online, bounded state, a response chosen per detector
"""
