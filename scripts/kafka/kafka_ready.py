#!/usr/bin/env python3
"""Exit 0 when a Kafka broker at HOST:PORT answers a Metadata request with at least one
broker, non-zero otherwise (with the cause on stderr). Used by scripts/stack.sh so that
"ready" means the broker really serves clients, not merely that the port is open.

    kafka_ready.py HOST PORT [--tls CA_FILE CERT_FILE KEY_FILE]

With --tls the request goes over TLS, verifying the broker against CA_FILE and
presenting the client certificate (for a listener that requires one).

Metadata v4 (non-flexible, still supported by Kafka 4.x): request header v1, body
topics = null (all), allow_auto_topic_creation = false.
"""
import socket
import ssl
import struct
import sys


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        data += chunk
    return data


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    tls = None
    if len(sys.argv) == 7 and sys.argv[3] == "--tls":
        tls = ssl.create_default_context(cafile=sys.argv[4])
        tls.load_cert_chain(sys.argv[5], sys.argv[6])
    client_id = b"stack-ready"
    correlation_id = 4242
    header = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    body = struct.pack(">i?", -1, False)
    request = header + body
    try:
        with socket.create_connection((host, port), timeout=3) as raw:
            sock = tls.wrap_socket(raw, server_hostname=host) if tls else raw
            sock.settimeout(3)
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", read_exact(sock, 4))
            payload = read_exact(sock, size)
    except OSError as err:
        print(f"kafka {host}:{port}: {err}", file=sys.stderr)
        return 1
    got_correlation, _throttle, brokers = struct.unpack(">iii", payload[:12])
    if got_correlation != correlation_id:
        print(f"kafka {host}:{port}: unexpected correlation id {got_correlation}", file=sys.stderr)
        return 1
    if brokers < 1:
        print(f"kafka {host}:{port}: metadata lists no broker yet", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
