"""resolve_redis_url(): the Redis URL from a flag, a mounted Secret file (what Kubernetes pods get) or the
environment, with errors that say what to fix."""

from __future__ import annotations

import pytest

from specfleet.state.connection import REDIS_URL_ENV, REDIS_URL_FILE_ENV, resolve_redis_url

URL = "redis://:p%40ss@redis.example:6379/0"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    monkeypatch.delenv(REDIS_URL_FILE_ENV, raising=False)


def test_flag_file_and_environment(tmp_path, monkeypatch):
    secret = tmp_path / "redis-url"
    secret.write_text(f"\n{URL}\n")  # a Secret written with a trailing newline, or a blank first line
    assert resolve_redis_url(URL, None) == URL
    assert resolve_redis_url(None, secret) == URL
    assert resolve_redis_url(None, None) is None
    monkeypatch.setenv(REDIS_URL_FILE_ENV, str(secret))
    assert resolve_redis_url(None, None) == URL
    assert resolve_redis_url("redis://other:6379/1", None) == "redis://other:6379/1"  # a flag wins over the env
    monkeypatch.setenv(REDIS_URL_ENV, URL)
    with pytest.raises(ValueError, match="unset one"):
        resolve_redis_url(None, None)
    monkeypatch.delenv(REDIS_URL_FILE_ENV)
    assert resolve_redis_url(None, None) == URL


def test_bad_input_says_what_to_fix(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        resolve_redis_url(URL, tmp_path / "x")
    with pytest.raises(ValueError, match="cannot read the Redis URL file"):
        resolve_redis_url(None, tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_redis_url(None, empty)
    wrong = tmp_path / "wrong"
    wrong.write_text("http://:secret@host:6379/0\n")
    with pytest.raises(ValueError, match="scheme") as caught:
        resolve_redis_url(None, wrong)
    assert "secret" not in str(caught.value)  # the password is masked in the message
