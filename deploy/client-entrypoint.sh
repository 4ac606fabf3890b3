#!/bin/sh
# Container entrypoint of petit-client (the compose demo): init and register on first
# start, pinning the server's CA from its (read-only) state volume, then run in the
# foreground. The registration persists on the client's own volume.
set -eu
config=/var/lib/petit/config.toml
if [ ! -f "$config" ]; then
  petit-client init -c "$config" --server "${PETIT_SERVER:-petit-server:3014}" \
    --ca "${PETIT_SERVER_CA:-/server-state/certificates/ca.crt}" \
    --local "${PETIT_LOCAL:-backend:8080}"
fi
if ! ls /var/lib/petit/tenants/*/registration >/dev/null 2>&1; then
  tries=0
  token_file=${PETIT_TOKEN_FILE:-/server-state/demo-client.token}
  # The server may still be making the token when this starts (depends_on waits for the
  # container, not its first-start init), so each try reads the file afresh.
  until token=$(cat "$token_file" 2>/dev/null || true)
    petit-client register -c "$config" ${token:+--token "$token"}; do
    tries=$((tries + 1))
    [ "$tries" -lt 30 ] || exit 1
    sleep 1
  done
fi
exec petit-client start --foreground -c "$config"
