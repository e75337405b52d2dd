#!/usr/bin/env python3
"""Sends Forward records with fluent-logger, pausing between records, and
keeps going when the connection is closed under it (as a recycle does).

Usage: send_paced.py HOST PORT SENDERS RECORDS PAUSE_MS

Each of SENDERS fluent-logger senders sends RECORDS records
{"sender": S, "seq": N} with tag "sluice.test.record", the senders taking
turns, PAUSE_MS between turns. fluent-logger finds a closed connection when
it next sends: that emit returns False and keeps the record pending; the
next emit reconnects and sends it first. At the end each sender emits
{"sender": S, "flush": true} until nothing is pending. Prints
"reconnects=N" (emits that found the connection closed); exits non-zero if
a sender still has records pending.
"""

import sys
import time

from fluent import sender

FLUSH_TRIES = 20


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    senders, records, pause = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    clients = [
        sender.FluentSender("sluice.test", host=host, port=port, timeout=5.0)
        for _ in range(senders)
    ]
    reconnects = 0
    for seq in range(records):
        for index, client in enumerate(clients):
            if not client.emit("record", {"sender": index, "seq": seq}):
                reconnects += 1
        time.sleep(pause / 1000.0)
    for index, client in enumerate(clients):
        for _ in range(FLUSH_TRIES):
            if client.emit("flush", {"sender": index, "flush": True}) and not client.pendings:
                break
            reconnects += 1
            time.sleep(0.05)
        if client.pendings:
            print(f"sender {index}: {len(client.pendings)} bytes unsent", file=sys.stderr)
            return 1
        client.close()
    print(f"reconnects={reconnects}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
