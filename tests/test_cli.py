"""The runwatch command: token, migrate, purge, and the verbs extensions add (the monitor)."""

from __future__ import annotations

import argparse
import ast
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import cli
from runtime.auth import TokenAuthority
from runtime.cli import Extensions, build_parser, main, parse_duration
from runtime.store.audit import AuditStore
from runtime.store.migrate import current_revision, head_revision

from .conftest import JWT_SECRET, sqlite_url


def runwatch(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_parse_duration() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("1h") == 3600
    assert parse_duration("90s") == 90
    assert parse_duration("1.5m") == 90


def test_token_mints_a_verifiable_jwt(tmp_path: Path) -> None:
    out = runwatch(
        "token",
        "--user",
        "alice",
        "--ttl",
        "2h",
        env={"RUNWATCH_JWT_SECRET": JWT_SECRET},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    identity = TokenAuthority(JWT_SECRET).verify(out.stdout.strip())
    assert identity.user_id == "alice"
    missing = runwatch("token", "--user", "alice", env={}, cwd=tmp_path)
    assert missing.returncode == 2 and "RUNWATCH_JWT_SECRET" in missing.stderr
    bad_user = runwatch(
        "token", "--user", "bad user!", env={"RUNWATCH_JWT_SECRET": JWT_SECRET}, cwd=tmp_path
    )
    assert bad_user.returncode == 2
    assert "invalid user name 'bad user!'" in bad_user.stderr
    assert "unauthorized" not in bad_user.stderr


def test_migrate_then_purge(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "rw.db")
    out = runwatch("migrate", env={"RUNWATCH_DATABASE_URL": url}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert current_revision(url) == head_revision()
    out = runwatch("purge", "--older-than", "30d", env={"RUNWATCH_DATABASE_URL": url}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "purged 0 runs" in out.stdout

    async def count() -> int:
        store = AuditStore.open(url)
        try:
            return len(await store.open_runs())
        finally:
            await store.close()

    assert asyncio.run(count()) == 0


def test_bad_configuration_is_a_clear_error(tmp_path: Path) -> None:
    out = runwatch("token", "--user", "a", env={"RUNWATCH_RUN_TIMEOUT_S": "soon"}, cwd=tmp_path)
    assert out.returncode == 2
    assert "RUNWATCH_RUN_TIMEOUT_S='soon'" in out.stderr


def test_every_help_page_describes_every_option_with_its_default() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"serve", "runtime", "monitor", "token", "migrate", "purge", "check"}
    for name, command in sub.choices.items():
        assert command.description, name
        text = command.format_help()
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            if not action.required and action.default not in (None, [], True, False):
                assert f"(default: {action.default}" in " ".join(text.split()), (name, action.dest)
    serve = " ".join(sub.choices["serve"].format_help().split())
    assert "(default: 127.0.0.1)" in serve and "(default: 8000)" in serve
    token = " ".join(sub.choices["token"].format_help().split())
    assert "(default: 1h)" in token


def verbs(parser: argparse.ArgumentParser) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_the_monitor_adds_its_verbs_through_its_entry_point() -> None:
    installed = Extensions.discover()
    assert installed.broken == {}
    monitor = installed.loaded["monitor"]
    assert [c.name for c in monitor.commands] == ["monitor", "check"]
    assert monitor.attach is not None, "runwatch serve embeds the monitor"
    # In the order of `runwatch --help` before the monitor became an extension.
    assert verbs(build_parser(installed)) == [
        "serve",
        "runtime",
        "monitor",
        "token",
        "migrate",
        "purge",
        "check",
    ]
    assert verbs(build_parser(Extensions())) == ["serve", "runtime", "token", "migrate", "purge"]


@pytest.mark.parametrize(
    ("extensions", "why"),
    [
        (Extensions(), "the runwatch.cli extension 'monitor' is not installed"),
        (
            Extensions(broken={"monitor": "monitor.cli:EXTENSION: ModuleNotFoundError: monitor"}),
            "the runwatch.cli extension 'monitor' could not be loaded "
            "(monitor.cli:EXTENSION: ModuleNotFoundError: monitor)",
        ),
    ],
)
def test_without_the_monitor_its_verbs_and_serve_are_one_line_and_exit_2(
    extensions: Extensions,
    why: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(Extensions, "discover", classmethod(lambda cls: extensions))
    monkeypatch.chdir(tmp_path)
    for argv in (["check"], ["--debug", "monitor", "--port", "1"], ["serve", "--port", "1"]):
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("runwatch: ") and why in lines[0], lines
    # Before anything is bound or touched; `runwatch runtime` is named as the way out.
    assert "or run `runwatch runtime` alone" in lines[0]
    assert not (tmp_path / "runwatch.db").exists()
    # The runtime's own verbs still work, and an unknown verb is still argparse's error.
    with pytest.raises(SystemExit) as exited:
        main(["token", "--help"])
    assert exited.value.code == 0
    capsys.readouterr()


def test_an_unknown_verb_with_the_monitor_installed_is_argparse_s_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bogus"])
    assert exited.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_the_runtime_never_imports_the_monitor() -> None:
    """Data and dependencies flow one way: the monitor reads the runtime's store; the runtime
    finds the monitor only through the runwatch.cli entry point."""
    root = Path(cli.__file__).resolve().parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [
                f"{path.relative_to(root)}:{node.lineno} {n}"
                for n in names
                if n == "monitor" or n.startswith("monitor.")
            ]
    assert found == []
