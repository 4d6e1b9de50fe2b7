"""A real 3-master Redis Cluster for tests: cluster-enabled redis-servers on free ports,
slots assigned and nodes introduced with CLUSTER commands (no redis-cli needed)."""

from __future__ import annotations

import random
import socket
import time

import redis

from redis_server import RedisServer

SLOTS = 16384


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; both must be < 65536."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster:
    """`tls`: (CA, certificate, key) files: the nodes then also listen with TLS on ports of
    their own (`tls_ports`), talk to each other over TLS, and announce those ports."""

    def __init__(self, masters: int = 3, tls: tuple[str, str, str] | None = None) -> None:
        self.tls = tls
        self.tls_ports = [cluster_port() for _ in range(masters)] if tls else []
        extra = []
        if tls:
            extra = ["--tls-ca-cert-file", tls[0], "--tls-cert-file", tls[1],
                     "--tls-key-file", tls[2], "--tls-auth-clients", "no",
                     "--tls-cluster", "yes"]
        self.nodes = [RedisServer("--cluster-enabled", "yes", "--cluster-config-file",
                                  "nodes.conf", "--cluster-node-timeout", "2000",
                                  *extra, *(["--tls-port", str(self.tls_ports[i])] if tls
                                            else []),
                                  port=cluster_port())
                      for i in range(masters)]

    @property
    def url(self) -> str:
        """What QUOTAGATE_REDIS_URL takes for a cluster: any node is a seed."""
        if self.tls:
            return "rediss+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.tls_ports)
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def seed_url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> RedisCluster:
        for n in self.nodes:
            n.start()
        if self.tls:
            clients = [redis.Redis(host="127.0.0.1", port=p, ssl=True, ssl_ca_certs=self.tls[0])
                       for p in self.tls_ports]
        else:
            clients = [redis.Redis(port=n.port) for n in self.nodes]
        per = SLOTS // len(self.nodes)
        for i, c in enumerate(clients):
            last = SLOTS - 1 if i == len(clients) - 1 else (i + 1) * per - 1
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        for c in clients[1:]:
            c.execute_command("CLUSTER", "MEET", "127.0.0.1",
                              self.tls_ports[0] if self.tls else self.nodes[0].port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [c.execute_command("CLUSTER", "INFO") for c in clients]
            text = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
            if all("cluster_state:ok" in t and f"cluster_known_nodes:{len(clients)}" in t
                   for t in text):
                for c in clients:
                    c.close()
                return self
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not converge")

    def close(self) -> None:
        for n in self.nodes:
            n.close()
