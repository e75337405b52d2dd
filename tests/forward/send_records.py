#!/usr/bin/env python3
"""Sends Forward records with fluent-logger, the Python client fluentd ships.

Usage: send_records.py HOST PORT SENDERS RECORDS

Opens SENDERS Forward connections (one fluent-logger sender each) and sends
RECORDS records through each, {"sender": S, "seq": N}, tag "sluice.test.record".
Every sender sends its first record before any sender closes, so all the
connections are open at once. Exits non-zero if any record could not be sent.
"""

import sys

from fluent import sender


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    senders, records = int(sys.argv[3]), int(sys.argv[4])
    clients = [
        sender.FluentSender("sluice.test", host=host, port=port, timeout=5.0)
        for _ in range(senders)
    ]
    for seq in range(records):
        for index, client in enumerate(clients):
            if not client.emit("record", {"sender": index, "seq": seq}):
                print(f"sender {index}: {client.last_error}", file=sys.stderr)
                return 1
    for index, client in enumerate(clients):
        # A record still buffered after a failed write would be lost by close().
        if client.pendings:
            print(f"sender {index}: {len(client.pendings)} bytes unsent", file=sys.stderr)
            return 1
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
