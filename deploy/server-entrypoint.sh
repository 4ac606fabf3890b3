#!/bin/sh
# Container entrypoint of petit-server: create the state on first start, then run in the
# foreground as PID 1's child-free main process, so SIGTERM/SIGINT (docker stop, Ctrl-C)
# reach it and it exits 0 after draining. A lock left by kill -9 is taken over by start.
set -eu
config=${PETIT_STATE:-/var/lib/petit}/config.toml
if [ ! -f "$config" ]; then
  # The control port listens on the container's interfaces so the host's loopback-only
  # published port reaches it; the allow-list admits loopback and the compose network.
  # So does the admin API (it needs adminToken, which init writes into the config).
  petit-server init -c "$config" --hostname "${PETIT_HOSTNAME:-localhost}" \
    --listen-addr 0.0.0.0 --admin-addr 0.0.0.0
  sed -i \
    -e "s|^listenAllow = .*|listenAllow = [\"127.0.0.1\", \"::1\", \"${PETIT_CONTROL_ALLOW:-172.28.0.0/16}\"]|" \
    -e "s|^endpoint = .*|endpoint = \"${PETIT_ENDPOINT:-http://REGID.localhost:8090}\"|" "$config"
fi
# Registration needs a one-time token. The compose demo asks for one for its client, in a file
# on this state volume (the client mounts it read-only). Made when the file is missing, so a
# start cut short between init and here makes it on the next; written beside and renamed, so
# the client never reads a half-written file.
if [ -n "${PETIT_DEMO_TOKEN_FILE:-}" ] && [ ! -f "$PETIT_DEMO_TOKEN_FILE" ]; then
  (umask 077 && petit-server token create -c "$config" --note "compose demo client" \
    >"$PETIT_DEMO_TOKEN_FILE.new" && mv "$PETIT_DEMO_TOKEN_FILE.new" "$PETIT_DEMO_TOKEN_FILE")
fi
exec petit-server start --foreground -c "$config"
