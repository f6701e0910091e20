"""The broker's exceptions: the one home of every error the shell raises.

The tree::

    BrokerError                     base of everything below; never raised itself
    ├── ConfigError                 broker.toml, BROKER_* or scope files are wrong (operator)
    ├── StoreError                  the store failed
    │   ├── StoreUnavailable        cannot read or write now (fail closed: calls are refused)
    │   └── NotFound                the row asked for does not exist (caller's fault)
    ├── AuthError                   a credential was refused
    │   ├── ClientAuthFailed        the agent's client credentials are wrong (OAuth invalid_client)
    │   └── AdminAuthFailed         an admin token is missing, unknown, revoked or lacks the role
    └── OAuthError                  a token-endpoint request is refused; carries the RFC 6749 code

Token verification failures are `broker.core.tokens.TokenRejected` (pure core, one reason per
failed check); they are mapped to 401 in the HTTP adapter, never raised through the shell.
Messages state what was expected and what was found; they never include a secret, a token or an
argument value.
"""

from __future__ import annotations

__all__ = [
    "AdminAuthFailed",
    "AuthError",
    "BrokerError",
    "ClientAuthFailed",
    "ConfigError",
    "NotFound",
    "OAuthError",
    "StoreError",
    "StoreUnavailable",
]


class BrokerError(Exception):
    """Base class of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """The configuration is invalid; the message names the key, the value and what was expected.

    Raised at start-up (or by a CLI command that loads the config); it is the operator's fault and
    stops the process with the message.
    """


class StoreError(BrokerError):
    """The store could not do what was asked."""


class StoreUnavailable(StoreError):
    """The database cannot be read or written right now.

    External circumstances (disk full, server down, lock timeout); the cause is kept in
    ``__cause__``. Every caller on the call path fails closed: the call is refused with
    ``store-unavailable`` and nothing already recorded is lost.
    """


class NotFound(StoreError):
    """The row asked for does not exist (an unknown agent id, token id, connector, ...)."""


class AuthError(BrokerError):
    """A credential was refused."""


class ClientAuthFailed(AuthError):
    """An agent's client authentication at the token endpoint failed (OAuth ``invalid_client``)."""


class AdminAuthFailed(AuthError):
    """An admin-API credential is missing, unknown, revoked, or lacks the role for the action."""


class OAuthError(BrokerError):
    """A token-endpoint request is refused with an RFC 6749 error code.

    ``error`` is the OAuth code (``invalid_request``, ``invalid_client``, ``invalid_grant``,
    ``invalid_scope``, ``unauthorized_client``, ``unsupported_grant_type``, ``access_denied``,
    ``authorization_pending``, ``invalid_target``); ``description`` is safe to send to the client.
    """

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
