"""WebSocket round trip against the chat service, with the standard library only.

Connects to CHAT_URL with the token in TOKEN_FILE, waits for `ready`, sends a
message and expects its `ack` and the message itself back. Exits non-zero
(with the reason) on anything else. Used by the chart's `helm test`.
"""

import base64
import json
import os
import socket
import struct
import sys
import time
import urllib.parse
import uuid


def connect(url, token):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "ws":
        raise SystemExit(f"only ws:// URLs are supported here, got {url}")
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    path = parts.path + "?" + urllib.parse.urlencode({"token": token})
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise SystemExit("connection closed during the handshake")
        head += chunk
    status = head.split(b"\r\n", 1)[0].decode()
    if " 101 " not in status + " ":
        raise SystemExit(f"handshake refused: {status}")
    return sock


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise SystemExit("connection closed")
        data += chunk
    return data


def send_frame(sock, opcode, payload):
    # Client frames are masked (RFC 6455 §5.3).
    mask = os.urandom(4)
    header = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        header += bytes([0x80 | n])
    elif n < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(header + mask + masked)


def recv_json(sock):
    """Next text frame as JSON; answers pings, fails on close."""
    while True:
        b0, b1 = recv_exact(sock, 2)
        opcode, n = b0 & 0x0F, b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", recv_exact(sock, 2))[0]
        elif n == 127:
            n = struct.unpack("!Q", recv_exact(sock, 8))[0]
        payload = recv_exact(sock, n)
        if opcode == 0x1:
            return json.loads(payload)
        if opcode == 0x9:
            send_frame(sock, 0xA, payload)
        elif opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            raise SystemExit(f"server closed the socket: {code} {payload[2:].decode(errors='replace')}")


def main():
    url = os.environ.get("CHAT_URL") or sys.argv[1]
    token_file = os.environ.get("TOKEN_FILE")
    token = open(token_file).read().strip() if token_file else os.environ["TOKEN"]
    deadline = time.monotonic() + 60
    while True:
        try:
            sock = connect(url, token)
            break
        except (OSError, SystemExit) as err:
            if time.monotonic() > deadline:
                raise SystemExit(f"cannot connect to {url}: {err}")
            time.sleep(2)
    ready = recv_json(sock)
    if ready.get("type") != "ready":
        raise SystemExit(f"expected ready, got {ready}")
    client_id = "helm-test-" + uuid.uuid4().hex[:12]
    body = f"helm test {client_id}"
    send_frame(sock, 0x1, json.dumps({"type": "message", "body": body, "client_id": client_id}).encode())
    acked = echoed = False
    while not (acked and echoed):
        frame = recv_json(sock)
        if frame.get("type") == "ack" and frame.get("client_id") == client_id:
            acked = True
        elif frame.get("type") == "message" and frame.get("client_id") == client_id:
            if frame.get("body") != body:
                raise SystemExit(f"message came back changed: {frame}")
            echoed = True
        elif frame.get("type") == "error":
            raise SystemExit(f"send refused: {frame}")
    send_frame(sock, 0x8, struct.pack("!H", 1000))
    print(f"ok: room {ready['room']['id']}, message seq {frame.get('seq')} acked and delivered")


if __name__ == "__main__":
    main()
