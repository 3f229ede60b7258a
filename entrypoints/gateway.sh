#!/usr/bin/env bash
# Runs the gateway of a multi-host pdserve cluster: the OpenAI endpoint, the global scheduler,
# and the control plane that instances on other hosts join.
#
#   PDSERVE_CLUSTER_SECRET=... entrypoints/gateway.sh [pdserve gateway flags]
#
# Environment:
#   PDSERVE_CLUSTER_SECRET  required; the same random string on every host of the cluster
#   PDSERVE_HOST            address the OpenAI endpoint binds            (default 0.0.0.0)
#   PDSERVE_PORT            port of the OpenAI endpoint                  (default 8000)
#   PDSERVE_CONTROL_HOST    address the control plane binds; instances
#                           reach it as PDSERVE_SCHEDULER=THIS_HOST:PORT (default 0.0.0.0)
#   PDSERVE_CONTROL_PORT    port of the control plane                    (default 7000)
#   PDSERVE_API_KEY         if set, clients must send 'Authorization: Bearer KEY'
#   PDSERVE_BIN             the pdserve command (default: pdserve on PATH, else ./.venv)
#
# Arguments are passed to `pdserve gateway` (e.g. --policy round-robin --max-inflight 512).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=entrypoints/common.sh
. "$here/common.sh"
case "${1:-}" in -h|--help) usage "$0"; exit 0 ;; esac

require_secret gateway.sh
bin=$(pdserve_bin)
args=(
  --host "${PDSERVE_HOST:-0.0.0.0}"
  --port "${PDSERVE_PORT:-8000}"
  --control-host "${PDSERVE_CONTROL_HOST:-0.0.0.0}"
  --control-port "${PDSERVE_CONTROL_PORT:-7000}"
)
echo "gateway.sh: $bin gateway ${args[*]} $*${PDSERVE_API_KEY:+ (with --api-key)}" >&2
if [ -n "${PDSERVE_API_KEY:-}" ]; then
  args+=(--api-key "$PDSERVE_API_KEY")
fi
exec "$bin" gateway "${args[@]}" "$@"
