"""kiln.redis_server without a Redis: a machine without redis-server is told how to get one."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.redis_server import RedisServer, RedisServerError


def test_a_missing_redis_server_says_to_run_make_setup(tmp_path):
    server = RedisServer(binary="redis-server-that-is-not-installed", workdir=tmp_path)
    with pytest.raises(RedisServerError, match=r"not installed.*make setup.*apt-get install redis-server"):
        server.start()
    assert server.process is None


def test_a_relative_workdir_is_made_absolute_for_redis_servers_own_cwd(tmp_path, monkeypatch):
    """redis-server runs inside its workdir, so a relative --dir would point nowhere (kiln serve
    passes build/<name>/server/redis)."""
    monkeypatch.chdir(tmp_path)
    server = RedisServer(workdir=Path("build/x/redis"))
    assert server.workdir == tmp_path / "build/x/redis"
    assert str(tmp_path) in " ".join(server.command("redis-server"))
