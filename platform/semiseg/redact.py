"""Credentials out of what is logged: the user:password part of URIs, secret-looking query parameters, and
the values of keys named like a password, token or secret. Applied to the grid file and settings before
they reach MLflow (artifacts, params) or the storage folder's grid.json."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_NAME = re.compile(
    r"(^|[^a-z])(passw(or)?d|pwd|token|secret|api_?key|access_?key|private_?key|credentials?)($|[^a-z])", re.I
)
"""Key names whose values are credentials, as words (`aws_secret_access_key`, not `tokenizer`)."""
USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#]*@")
QUERY = re.compile(r"(?P<name>[?&;][^=&#\s]+)=(?P<value>[^&#\s]*)")
QUERY_SECRET = re.compile(SECRET_NAME.pattern + r"|[^a-z]sig(nature)?$|^[?&;]key$", re.I)
"""Query parameters that carry a credential: the names above, signed URLs' signatures (`sig`,
`X-Amz-Signature`) and a bare `key`."""


def text(value: str) -> str:
    """`value` with every URI's userinfo and each secret query parameter's value replaced by ***."""
    value = USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", value)
    return QUERY.sub(lambda m: f"{m['name']}={MASK}" if QUERY_SECRET.search(m["name"]) else m[0], value)


def data(value: Any) -> Any:
    """A copy of nested plain data: `text` applied to every string, secret-named keys' values masked."""
    if isinstance(value, dict):
        return {k: MASK if _secret(k, v) else data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [data(v) for v in value]
    return text(value) if isinstance(value, str) else value


def _secret(key: Any, value: Any) -> bool:
    return isinstance(key, str) and SECRET_NAME.search(key) is not None and value is not None
