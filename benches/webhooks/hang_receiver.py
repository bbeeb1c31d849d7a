#!/usr/bin/env python3
"""A webhook receiver that never answers, for benches/webhooks_dead_receiver.sh.

    python3 hang_receiver.py PORT

Listens on 127.0.0.1:PORT, accepts every connection, reads (and discards) whatever
the client sends and never writes a byte back: each call stays open until the client
gives up (verdict's webhook `timeout_ms`) and closes its end. Every 5 s it prints one
line to stderr: connections accepted so far, open now, and bytes read.
"""
import asyncio
import sys

accepted = 0
open_now = 0
read_bytes = 0


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global accepted, open_now, read_bytes
    accepted += 1
    open_now += 1
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            read_bytes += len(chunk)
    except (ConnectionError, OSError):
        pass
    finally:
        open_now -= 1
        writer.close()


async def report() -> None:
    while True:
        await asyncio.sleep(5)
        print(f"accepted {accepted} open {open_now} read_bytes {read_bytes}", file=sys.stderr, flush=True)


async def main(port: int) -> None:
    server = await asyncio.start_server(hold, "127.0.0.1", port, backlog=1024)
    print(f"listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    asyncio.get_running_loop().create_task(report())
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main(int(sys.argv[1])))
    except KeyboardInterrupt:
        pass
