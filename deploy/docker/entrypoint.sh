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
STOCKADE_DAEMON_STATE=${STOCKADE_DAEMON_STATE:-/var/lib/stockade-daemon}
export STOCKADE_HOME STOCKADE_RUN STOCKADE_LOG_DIR STOCKADE_SECRETS_FILE STOCKADE_BROKER_STATE STOCKADE_DAEMON_STATE

"$STOCKADE_HOME/.venv/bin/stockade" setup-users >/dev/null
install -d -m 0755 -o root -g root "$STOCKADE_RUN"
install -d -m 0700 -o root -g root "$STOCKADE_LOG_DIR"

# The broker keeps its secrets: a copy of the given file (often mounted read-only) that is its own,
# mode 0600, in a directory only root writes.
install -d -m 0755 -o root -g root /run/stockade-secrets
if [ -f "$STOCKADE_SECRETS_FILE" ]; then
    install -m 0600 -o stockade-secrets -g stockade-secrets "$STOCKADE_SECRETS_FILE" /run/stockade-secrets/secrets.json
else
    echo "stockade: no secrets file at $STOCKADE_SECRETS_FILE: the broker starts with none" >&2
    install -m 0600 -o stockade-secrets -g stockade-secrets /dev/null /run/stockade-secrets/secrets.json
    printf '{}\n' > /run/stockade-secrets/secrets.json
fi
STOCKADE_SECRETS_FILE=/run/stockade-secrets/secrets.json

# A session key given in the environment goes to the key file (the broker takes it over when it
# starts), and out of the environment: no process under supervisord inherits it.
if [ -n "${STOCKADE_SESSION_KEY:-}" ]; then
    umask 0077
    printf '%s\n' "$STOCKADE_SESSION_KEY" > "$STOCKADE_RUN/.session"
    unset STOCKADE_SESSION_KEY
fi
exec supervisord -c "$STOCKADE_HOME/deploy/docker/supervisord.conf" "$@"
