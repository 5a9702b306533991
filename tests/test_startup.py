"""Starting a service where one already runs: it refuses with a clear error, instead of sharing
the port (SO_REUSEPORT) and silently splitting the traffic between two copies."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from services.common.server import PortInUse
from services.common.settings import CacheSettings, GatewaySettings
from services.mesh import Ports, free_port, start_mesh
from tests.conftest import ServiceEnv


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_a_grpc_service_whose_port_is_taken_refuses_to_start(env: ServiceEnv) -> None:
    from services.cache.service import start as start_cache

    with listening_socket() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=str(port)):
            await start_cache(env.settings(CacheSettings, listen_addr=f"127.0.0.1:{port}"))


async def test_a_gateway_whose_http_port_is_taken_refuses_to_start(env: ServiceEnv) -> None:
    from services.gateway.service import start as start_gateway

    with listening_socket() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=str(port)):
            await start_gateway(env.settings(GatewaySettings, http_port=port))


def test_a_second_mesh_on_the_same_ports_refuses_before_starting_anything(tmp_path: Path) -> None:
    with listening_socket() as taken:
        ports = Ports(free_port(), free_port(), free_port(), free_port(), taken.getsockname()[1])
        with pytest.raises(PortInUse, match="already running"):
            start_mesh(tmp_path, ports)
    assert not (tmp_path / "postgres").exists()  # no store was started
