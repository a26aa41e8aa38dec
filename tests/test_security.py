"""Security: token checks, dev mode only on loopback, tokens never logged or stored."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed

from runtime.auth import AuthError, TokenAuthority
from runtime.client import RunwatchClient
from runtime.events import new_id
from runtime.protocol import Connect

from .conftest import JWT_SECRET, make_token, open_ws, sqlite_url, start_server_process


def _hs512(claims: dict[str, object]) -> str:
    # The same secret under another algorithm (PyJWT warns that it is short for SHA-512).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jwt.encode(claims, JWT_SECRET, algorithm="HS512")


def test_tokens_are_pinned_to_hs256_with_exp_required() -> None:
    auth = TokenAuthority(JWT_SECRET, leeway_s=30)
    assert auth.verify(auth.mint("alice")).user_id == "alice"
    now = int(time.time())
    forged = [
        # alg none
        base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        + "."
        + base64.urlsafe_b64encode(json.dumps({"sub": "alice", "exp": now + 60}).encode())
        .rstrip(b"=")
        .decode()
        + ".",
        # another HMAC algorithm with the right secret
        _hs512({"sub": "alice", "exp": now + 60}),
        # no exp
        jwt.encode({"sub": "alice"}, JWT_SECRET, algorithm="HS256"),
        # no sub
        jwt.encode({"exp": now + 60}, JWT_SECRET, algorithm="HS256"),
        # a sub that is not a user id
        jwt.encode({"sub": "a b\n", "exp": now + 60}, JWT_SECRET, algorithm="HS256"),
        # expired beyond the allowed skew
        jwt.encode({"sub": "alice", "exp": now - 31}, JWT_SECRET, algorithm="HS256"),
    ]
    for token in forged:
        with pytest.raises(AuthError):
            auth.verify(token)
    # Within the skew is accepted: clocks differ a little.
    assert auth.verify(jwt.encode({"sub": "a", "exp": now - 5}, JWT_SECRET, algorithm="HS256"))


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenAuthority("short")


def test_run_ids_are_unguessable() -> None:
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    # 80 random bits after the 48-bit time: consecutive ids share no more than the time part.
    tails = {i[10:] for i in ids}
    assert len(tails) == 1000


def test_dev_mode_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env["RUNWATCH_DATABASE_URL"] = sqlite_url(tmp_path / "rw.db")
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "refusing to start in dev mode" in result.stderr


async def test_tokens_never_reach_the_log_or_the_store(tmp_path: Path) -> None:
    db_path = tmp_path / "rw.db"
    env = {
        "RUNWATCH_DATABASE_URL": sqlite_url(db_path),
        "RUNWATCH_JWT_SECRET": JWT_SECRET,
        "RUNWATCH_LOG_LEVEL": "debug",
    }
    server = start_server_process(tmp_path, env)
    token = make_token("alice")
    bad = make_token("mallory", secret="x" * 40)
    try:
        client = RunwatchClient(server.ws_url, token)
        await client.connect()
        await (await client.chat("what is 1+1")).wait(10)
        await client.close()
        async with await open_ws(server.ws_url) as ws:
            await ws.send(Connect(bad).serialize())
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
    log = server.log()
    assert "connect refused" in log
    for secret in (token, bad, JWT_SECRET):
        assert secret not in log
        for path in tmp_path.rglob("rw.db*"):
            assert secret.encode() not in path.read_bytes()


async def test_dev_token_endpoint_only_in_dev_mode(tmp_path: Path) -> None:
    env = {"RUNWATCH_DATABASE_URL": sqlite_url(tmp_path / "rw.db")}
    dev = start_server_process(tmp_path, env, name="dev")
    try:
        async with httpx.AsyncClient() as http:
            got = await http.post(f"{dev.http_url}/dev/token", json={"user": "alice"})
            assert got.status_code == 200 and got.json()["user_id"] == "alice"
            bad = await http.post(f"{dev.http_url}/dev/token", json={"user": "<script>"})
            assert bad.status_code == 400
            # No body (or no user) is the user "dev"; a body that says something else is not.
            empty = await http.post(f"{dev.http_url}/dev/token")
            assert empty.status_code == 200 and empty.json()["user_id"] == "dev"
            for body, detail in [
                (b"user=alice", "body is not JSON"),
                (b"[1]", 'body must be {"user": "name"}'),
                (b'{"user": 5}', "invalid user name"),
            ]:
                refused = await http.post(f"{dev.http_url}/dev/token", content=body)
                assert refused.status_code == 400 and refused.json()["detail"] == detail
    finally:
        dev.proc.send_signal(signal.SIGTERM)
        dev.proc.wait(30)
    assert "DEV MODE" in dev.log()
    env["RUNWATCH_JWT_SECRET"] = JWT_SECRET
    prod = start_server_process(tmp_path, env, name="prod")
    try:
        async with httpx.AsyncClient() as http:
            got = await http.post(f"{prod.http_url}/dev/token", json={"user": "alice"})
            assert got.status_code == 404
    finally:
        prod.proc.send_signal(signal.SIGTERM)
        prod.proc.wait(30)
