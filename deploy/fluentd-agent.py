#!/usr/bin/env python3
"""An agent-check agent for a fluentd aggregator (sluice SPEC §13, HAProxy's
agent protocol): answers each connection with one line steering the share of
new connections sluice sends to this aggregator, from how far its output
buffers are backed up.

It reads fluentd's monitor_agent (`<source> @type monitor_agent`, port 24220
by default) and takes the longest `buffer_queue_length` of the output plugins:

    0 queued chunks                  -> "up 100%"
    fewer than --queue-limit chunks  -> "up N%", N falling linearly to --floor
    --queue-limit or more            -> "drain" (open connections go on)

When monitor_agent cannot be read it closes without an answer, which leaves
the aggregator as it was: telling a dead fluentd apart is the health
check's job, not the agent's.

Only the standard library; run it beside fluentd, e.g.

    fluentd-agent.py --listen 0.0.0.0:9999 --queue-limit 64

and give the server `[upstream.NAME.server.agent_check] port = 9999`.
"""

import argparse
import json
import socketserver
import sys
import urllib.request

# monitor_agent answers in well under a second; the reply must be ready
# within sluice's agent_check timeout (1s by default).
MONITOR_TIMEOUT = 0.5
# A monitor_agent answer is a few KB per plugin; never read without bound.
MAX_MONITOR_BYTES = 1 << 20


def queue_length(monitor_url):
    """The longest buffer queue of fluentd's output plugins."""
    with urllib.request.urlopen(monitor_url, timeout=MONITOR_TIMEOUT) as reply:
        body = reply.read(MAX_MONITOR_BYTES + 1)
    if len(body) > MAX_MONITOR_BYTES:
        raise ValueError("monitor_agent answer larger than 1 MB")
    plugins = json.loads(body).get("plugins", [])
    return max(
        (
            int(plugin["buffer_queue_length"])
            for plugin in plugins
            if plugin.get("output_plugin") and "buffer_queue_length" in plugin
        ),
        default=0,
    )


def answer(queued, queue_limit, floor):
    """The agent line for `queued` chunks."""
    if queued >= queue_limit:
        return "drain"
    percent = round(100 - (100 - floor) * queued / queue_limit)
    return f"up {max(floor, percent)}%"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="0.0.0.0:9999", help="HOST:PORT to answer on")
    parser.add_argument(
        "--monitor",
        default="http://127.0.0.1:24220/api/plugins.json",
        help="fluentd monitor_agent's plugins.json",
    )
    parser.add_argument(
        "--queue-limit", type=int, default=64, help="queued chunks at which to drain"
    )
    parser.add_argument(
        "--floor", type=int, default=10, help="lowest percentage before draining"
    )
    args = parser.parse_args()
    if args.queue_limit < 1 or not 1 <= args.floor <= 100:
        parser.error("--queue-limit must be at least 1 and --floor 1-100")
    host, _, port = args.listen.rpartition(":")

    class Agent(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                queued = queue_length(args.monitor)
            except (OSError, ValueError, KeyError, TypeError) as err:
                print(f"fluentd-agent: cannot read {args.monitor}: {err}", file=sys.stderr)
                return
            self.request.sendall((answer(queued, args.queue_limit, args.floor) + "\n").encode())

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer((host.strip("[]"), int(port)), Agent) as server:
        print(f"fluentd-agent: answering on {args.listen}", file=sys.stderr, flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
