# Sourced by bench/syscalls and bench/instructions: a work directory removed
# on exit with every process in `pids`, two free loopback ports
# ($backend_port, $listen_port), and sluice's configuration for one HTTP
# listener in front of the backend, as bench/compare writes it
# (`access_log = false`), in $work/sluice.toml.
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
backend_port=$(free_port)
listen_port=$(free_port)
cat >"$work/sluice.toml" <<CONF
[[listener]]
name = "http"
bind = "127.0.0.1:$listen_port"
upstream = "http"
access_log = false

[upstream.http]
[[upstream.http.server]]
address = "127.0.0.1:$backend_port"
CONF

# Waits, 30 s at most, until the backend and sluice accept connections.
wait_for_ports() {
    for port in "$backend_port" "$listen_port"; do
        for _ in $(seq 300); do
            (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
            sleep 0.1
        done
    done
}
