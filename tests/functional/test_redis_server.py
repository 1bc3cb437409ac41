"""kiln.redis_server: a real redis-server on a free loopback port, killed and restarted on the
same port, and gone (process and folder) once stopped."""

from __future__ import annotations

import redis

from kiln.redis_server import RedisServer


def test_a_killed_redis_comes_back_empty_on_the_same_port_and_stop_leaves_nothing():
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("x", "1")
        port, workdir = server.port, server.workdir
        assert server.url == f"redis://127.0.0.1:{port}/0"
        server.kill()
        assert not server.ping() and server.process.returncode == -9
        server.restart()
        assert server.port == port and client.get("x") is None  # nothing persisted
        assert client.config_get("save") == {"save": ""} and client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        client.close()
    assert server.process.poll() is not None and not server.ping()
    assert not workdir.exists()
