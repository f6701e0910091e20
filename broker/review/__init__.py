"""The review page ``/review``: server-rendered HTML for security reviewers. Shell.

Starlette routes and Jinja2 templates with autoescape on; no front-end build and no script at
all (the CSP forbids it). `routes` holds the pages and their checks, `auth` the logins, CSRF and
same-origin rules, `render` how recorded (untrusted) data is shown. Templates live in
``templates/`` and the one stylesheet in ``static/``.
"""

from __future__ import annotations

from broker.review.routes import CSP, SECURITY_HEADERS, review_routes

__all__ = ["CSP", "SECURITY_HEADERS", "review_routes"]
