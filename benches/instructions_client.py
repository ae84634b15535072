"""The client of benches/instructions.sh: N requests (GET, or keyless POST of a 1 KiB JSON body
like benches/wrk/post.lua) over C keep-alive connections to 127.0.0.1:PORT, sequential on
each; fails unless every answer is 200. Standard library only.

Kinds: `get`, `post` (keyless), `replay` (the 1 KiB POST with one Idempotency-Key: after its
first execution every request is a replay), `new` (the 1 KiB POST with a new key on every
request: first executions; keys are unique per process, so a warm-up and a measured run never
share one)."""
import os
import socket
import sys
import threading
import time

BODY = b'{"sku":"bench","qty":1,"pad":"' + b"x" * (1024 - 31) + b'"}'


RUN = f"{os.getpid()}-{time.time_ns()}"


def request(kind: str, conn: int, n: int) -> bytes:
    if kind == "get":
        return b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    key = b""
    if kind == "replay":
        key = b"Idempotency-Key: instructions-replay\r\n"
    elif kind == "new":
        key = f"Idempotency-Key: {RUN}-{conn}-{n}\r\n".encode()
    return (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + key
            + b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


def run(port: int, count: int, kind: str, conn: int, errors: list) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        for n in range(count):
            s.sendall(request(kind, conn, n))
            while b"\r\n\r\n" not in buf:
                buf += s.recv(65536)
            head, buf = buf.split(b"\r\n\r\n", 1)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n", 1)[0])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buf) < length:
                buf += s.recv(65536)
            buf = buf[length:]


def main() -> int:
    port, n, conns, kind = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    errors: list = []
    threads = [threading.Thread(target=run, args=(port, n // conns, kind, c, errors)) for c in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"instructions: {len(errors)} answers were not 200, e.g. {errors[0]!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
