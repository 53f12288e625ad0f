#!/usr/bin/env python3
"""Cargo runner for wasm32-wasip1 test binaries (`python3 scripts/wasi-run.py file.wasm [args]`).

`make test` runs the filter's pure-logic tests a second time compiled to wasm32-wasip1, so
we know the core behaves the same inside a wasm VM as natively. It uses the wasmtime
Python package (installed by scripts/install-tools.sh). The filter's proxy-wasm host
imports are linked as traps: the pure tests never call them.
"""
import os
import sys

from wasmtime import Engine, ExitTrap, Linker, Module, Store, WasiConfig


def main() -> int:
    wasm, args = sys.argv[1], sys.argv[1:]
    engine = Engine()
    linker = Linker(engine)
    linker.define_wasi()
    wasi = WasiConfig()
    wasi.argv = args
    wasi.env = [(k, v) for k, v in os.environ.items() if k.startswith(("CARGO", "RUST", "CI"))]
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    wasi.inherit_stdin()
    wasi.preopen_dir("/", "/")  # the recorded corpus lives outside the crate
    store = Store(engine)
    store.set_wasi(wasi)
    module = Module.from_file(engine, wasm)
    linker.define_unknown_imports_as_traps(module)
    instance = linker.instantiate(store, module)
    try:
        instance.exports(store)["_start"](store)
    except ExitTrap as exit_trap:
        return exit_trap.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
