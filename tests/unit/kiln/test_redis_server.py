"""kiln.redis_server without a Redis: a machine without redis-server is told how to get one."""

from __future__ import annotations

import pytest

from kiln.redis_server import RedisServer, RedisServerError


def test_a_missing_redis_server_says_to_run_make_setup(tmp_path):
    server = RedisServer(binary="redis-server-that-is-not-installed", workdir=tmp_path)
    with pytest.raises(RedisServerError, match=r"not installed.*make setup.*apt-get install redis-server"):
        server.start()
    assert server.process is None
