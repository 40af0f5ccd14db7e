#!/usr/bin/python3
"""A WAN link on loopback: a TCP relay that adds a one-way delay and caps the bandwidth of each
direction (issues 21 and 27).

    python3 bench/wanlink.py --listen 8081 --to 8080 --delay-ms 10 --rate-mbytes 125

Every connection to 127.0.0.1:LISTEN is relayed to 127.0.0.1:TO. Each byte is held for DELAY
in its direction (so a request and its answer take 2 x DELAY more: the round trip), then sent on
no faster than RATE per direction and connection-wide (a token bucket with 5 ms of burst,
shared by all connections of that direction, as a link's capacity is). Connections stay
pipelined (a delay, not a stop-and-wait), and each direction buffers at most 256 reads of
64 KiB before it stops reading, so TCP back-pressure still reaches the sender. This VM's kernel
has no sch_netem, hence a relay; it is the same model as tests/remote.rs's `Link`.

Prints "listening PORT" on stdout once it accepts connections (--listen 0: a free port), and
runs until killed.
"""

import argparse
import asyncio
import sys
import time


class Bucket:
    """A direction's capacity: `rate` bytes a second, 5 ms of burst."""

    def __init__(self, rate):
        self.rate = rate
        self.free_at = time.monotonic()

    async def take(self, n):
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.free_at = max(self.free_at, now - 0.005) + n / self.rate
        if self.free_at > now + 0.001:
            await asyncio.sleep(self.free_at - now)


async def pipe(reader, writer, delay, bucket):
    queue = asyncio.Queue(256)

    async def read_side():
        while True:
            try:
                data = await reader.read(64 << 10)
            except (ConnectionError, OSError):
                data = b""
            await queue.put((time.monotonic() + delay, data))
            if not data:
                return

    async def write_side():
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                try:
                    writer.write_eof()
                except (ConnectionError, OSError, RuntimeError):
                    pass
                return
            await bucket.take(len(data))
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                return

    await asyncio.gather(read_side(), write_side())


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=int, default=0, help="loopback port to listen on (0: any)")
    p.add_argument("--to", type=int, required=True, help="loopback port to relay to")
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    p.add_argument(
        "--rate-mbytes",
        type=float,
        default=125.0,
        help="MB/s (10^6 bytes) per direction, 0: no cap (default 125)",
    )
    a = p.parse_args()
    delay = a.delay_ms / 1000.0
    up, down = Bucket(a.rate_mbytes * 1e6), Bucket(a.rate_mbytes * 1e6)

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", a.to)
        except OSError:
            client_w.close()
            return
        for w in (client_w, server_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(
                pipe(client_r, server_w, delay, up), pipe(server_r, client_w, delay, down)
            )
        finally:
            for w in (client_w, server_w):
                try:
                    w.close()
                except (ConnectionError, OSError, RuntimeError):
                    pass

    server = await asyncio.start_server(handle, "127.0.0.1", a.listen, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
