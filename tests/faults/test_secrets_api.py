"""serve's API token: a non-ASCII token answers 401, not 500 (issue 23).

The check itself is driven with requests as the ASGI server hands them over
(query string and headers as bytes); an exception other than a 401
HTTPException is what FastAPI turns into HTTP 500.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest
from fastapi import HTTPException
from starlette.requests import Request

from hxn_liveptycho.control.api import _bearer

TOKEN = "s3cret-token"


def _check(query: str = "", authorization: bytes | None = None) -> int:
    headers = [(b"authorization", authorization)] if authorization is not None else []
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/status",
        "query_string": query.encode("ascii"),
        "headers": headers,
    }
    try:
        asyncio.run(_bearer(TOKEN)(Request(scope)))
    except HTTPException as exc:
        return exc.status_code
    return 200


def test_the_right_token_passes_and_a_wrong_one_is_401() -> None:
    assert _check(f"token={TOKEN}") == 200
    assert _check(authorization=f"Bearer {TOKEN}".encode()) == 200
    assert _check("token=nope") == 401
    assert _check() == 401


@pytest.mark.parametrize("where", ["query", "header"])
def test_a_non_ascii_token_is_401_not_500(where: str) -> None:
    # Before: hmac.compare_digest raised TypeError on a non-ASCII str, an HTTP 500.
    if where == "query":
        assert _check("token=" + quote("s3cret-tökén")) == 401
        assert _check("token=%ff%fe") == 401
    else:
        assert _check(authorization="Bearer s3cret-tökén".encode()) == 401
