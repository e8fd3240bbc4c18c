import os

import pytest

from mate import cli, env


def test_defaults_parse(monkeypatch):
    for var in env.VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    assert env.get("MATE_LOGLEVEL") == 0
    assert env.get("MATE_BACKEND") == "auto"
    assert env.get("MATE_JIT") is True
    assert env.get("MATE_ALLOW_REFERENCE_FALLBACK") is False


@pytest.mark.parametrize("name, bad", [
    ("MATE_LOGLEVEL", "2"), ("MATE_LOGLEVEL", "verbose"), ("MATE_BACKEND", "cuda"),
    ("MATE_JIT", "maybe"), ("MATE_ALLOW_REFERENCE_FALLBACK", "2"), ("MATE_CACHE_DIR", " "),
])
def test_bad_values_are_rejected_naming_the_variable(monkeypatch, name, bad):
    monkeypatch.setenv(name, bad)
    with pytest.raises(env.MateEnvError, match=f"{name}={bad!r} is not accepted: expected"):
        env.get(name)


def test_value_changes_are_seen(monkeypatch):
    monkeypatch.setenv("MATE_LOGLEVEL", "3")
    assert env.get("MATE_LOGLEVEL") == 3
    monkeypatch.setenv("MATE_LOGLEVEL", "10")
    assert env.get("MATE_LOGLEVEL") == 10


def test_unset_and_direct_writes_are_seen(monkeypatch):
    monkeypatch.setenv("MATE_BACKEND", "reference")
    assert env.get("MATE_BACKEND") == "reference"
    monkeypatch.delenv("MATE_BACKEND")
    assert env.get("MATE_BACKEND") == "auto"
    os.environ["MATE_BACKEND"] = "tilelang"  # not through monkeypatch
    try:
        assert env.get("MATE_BACKEND") == "tilelang"
    finally:
        del os.environ["MATE_BACKEND"]
    assert env.get("MATE_BACKEND") == "auto"


def test_env_command_flags_invalid_values(monkeypatch, capsys):
    monkeypatch.setenv("MATE_BACKEND", "fast")
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "MATE_BACKEND" in out and "INVALID" in out and "fast" in out


def test_invalid_value_fails_a_command_cleanly(monkeypatch, capsys):
    monkeypatch.setenv("MATE_JIT", "perhaps")
    assert cli.main(["show-config"]) == 2
    assert "MATE_JIT='perhaps' is not accepted" in capsys.readouterr().err
