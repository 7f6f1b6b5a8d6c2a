#!/usr/bin/env bash
# Create .venv and install minigpt4-bot into it.   Usage: scripts/setup.sh [--dev | --vllm]
# --dev adds the test tools and the system packages the tests use (scripts/test-deps.sh) and the vLLM
# environment the vllm backend's tests run (scripts/setup-vllm.sh); --vllm adds only the vLLM environment
# (.venv-vllm, for [engine] backend = "vllm").
#
# torch is installed first, and only if the venv has none: TORCH_SPEC (default "torch==2.13.0",
# the CPU build on machines that carry its wheel). GPU users install a CUDA build first, e.g.
#   python3 -m venv .venv && .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu128
# or run:  TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" scripts/setup.sh
# and add bitsandbytes for int8/nf4 with:  .venv/bin/pip install -e ".[gpu]"
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
vllm=0
if [[ "${1:-}" == "--dev" ]]; then
    extras="[dev]"
    vllm=1
    ./scripts/test-deps.sh  # chromium + postgresql binaries for the web and database tests
elif [[ "${1:-}" == "--vllm" ]]; then
    vllm=1
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry extra pip arguments on purpose
    "${pip[@]}" install ${TORCH_SPEC:-torch==2.13.0}
fi
"${pip[@]}" install -e ".${extras}"
echo "minigpt4-bot is installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))" >&2
if [[ $vllm == 1 ]]; then
    ./scripts/setup-vllm.sh
fi
