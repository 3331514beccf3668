"""Fixtures of the client's tests: one `spinyard up` stack for the module (the whole stack, as
docs/client.md's reader runs it: real nats-server, S3 server, handlers, gateway, local
processes), a token that may use every app and publish `alice`'s, and a TCP relay whose
connections a test can cut."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from dispatcher.gateway.auth import mint


@pytest.fixture(scope="module")
def stack(launch_up) -> dict:
    """`spinyard up` with the example apps; `token` may use every app and publish alice's."""
    up = launch_up()
    secret = (up["data"] / "dev-secret").read_text().strip()
    up["token"] = mint(secret, ["*"], publish=["alice"], subject="ci-alice")
    up["page_token"] = mint(secret, ["*"])
    return up


class Relay:
    """A TCP relay to a server; `cut()` drops every connection through it, as a proxy or a
    network blip would, while the server keeps running."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self.writers.discard(w)
                w.close()

    def cut(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def relay(stack) -> AsyncIterator[Relay]:
    """A relay to the stack's gateway; its URL is `relay.url`."""
    host, port = stack["url"].removeprefix("http://").split(":")
    relay = Relay(host, int(port))
    relay.url = await relay.start()
    yield relay
    await relay.close()
