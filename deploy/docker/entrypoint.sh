#!/bin/sh
# stockade's container entrypoint: the three identities, /run/stockade, then supervisord.
#
#   STOCKADE_SESSION_KEY   the broker's session key, base64 (generated when unset)
#   STOCKADE_SECRETS_FILE  the secrets (default /etc/stockade/secrets.json, mounted read-only)
set -eu

STOCKADE_HOME=${STOCKADE_HOME:-/opt/stockade}
STOCKADE_RUN=${STOCKADE_RUN:-/run/stockade}
STOCKADE_LOG_DIR=${STOCKADE_LOG_DIR:-/var/log/stockade}
STOCKADE_SECRETS_FILE=${STOCKADE_SECRETS_FILE:-/etc/stockade/secrets.json}
STOCKADE_BROKER_STATE=${STOCKADE_BROKER_STATE:-/var/lib/stockade-secrets}
export STOCKADE_HOME STOCKADE_RUN STOCKADE_LOG_DIR STOCKADE_SECRETS_FILE STOCKADE_BROKER_STATE

"$STOCKADE_HOME/.venv/bin/stockade" setup-users >/dev/null
install -d -m 0755 -o root -g root "$STOCKADE_RUN"
install -d -m 0700 -o root -g root "$STOCKADE_LOG_DIR"

if [ ! -f "$STOCKADE_SECRETS_FILE" ]; then
    echo "stockade: no secrets file at $STOCKADE_SECRETS_FILE: the broker starts with none" >&2
    install -d -m 0755 "$(dirname "$STOCKADE_SECRETS_FILE")"
    printf '{}\n' > "$STOCKADE_SECRETS_FILE"
fi
# The broker keeps its secrets: its own file, no one else's to read.
chown stockade-secrets "$STOCKADE_SECRETS_FILE"
chmod 0600 "$STOCKADE_SECRETS_FILE"

# A session key given in the environment goes to the key file (the broker takes it over when it
# starts), and out of the environment: no process under supervisord inherits it.
if [ -n "${STOCKADE_SESSION_KEY:-}" ]; then
    umask 0077
    printf '%s\n' "$STOCKADE_SESSION_KEY" > "$STOCKADE_RUN/.session"
    unset STOCKADE_SESSION_KEY
fi
exec supervisord -c "$STOCKADE_HOME/deploy/docker/supervisord.conf" "$@"
