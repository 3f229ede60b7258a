#!/usr/bin/env bash
# Runs a decode instance that joins a remote pdserve gateway (see instance.sh for everything).
#
#   PDSERVE_SCHEDULER=GATEWAY_HOST:7000 PDSERVE_CLUSTER_SECRET=... \
#     entrypoints/decode.sh [pdserve instance flags] [vLLM args]
#
# Environment: PDSERVE_SCHEDULER and PDSERVE_CLUSTER_SECRET (required), PDSERVE_ADVERTISE_HOST,
# PDSERVE_HOST, PDSERVE_PORT, PDSERVE_MODEL, PDSERVE_INSTANCE_ID, PDSERVE_KV_PORT,
# PDSERVE_CONTROL_PORT, PDSERVE_BIN: see `entrypoints/instance.sh --help`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
case "${1:-}" in
  -h|--help) exec "$here/instance.sh" --help ;;
esac
exec "$here/instance.sh" decode "$@"
