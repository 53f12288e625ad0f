#!/usr/bin/env python3
"""Run a wasm32-wasip1 command module under wasmtime (the `wasmtime` wheel from PyPI).

usage: run_wasm.py MODULE.wasm [ARGS...]

Every directory named after a `--corpus` argument is preopened at the same path, so the
module reads it as the native binary does. stdout/stderr are inherited. Exits with the
module's exit code.
"""
import os
import sys

import wasmtime


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    module_path, args = sys.argv[1], sys.argv[2:]
    config = wasmtime.Config()
    config.cranelift_opt_level = "speed"
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = [os.path.basename(module_path)] + args
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    for flag, value in zip(args, args[1:]):
        if flag == "--corpus" and os.path.isdir(value):
            wasi.preopen_dir(value, value)
    store.set_wasi(wasi)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    module = wasmtime.Module.from_file(engine, module_path)
    # The filter crate links the proxy-wasm SDK, whose host imports this bench never calls.
    linker.define_unknown_imports_as_traps(module)
    instance = linker.instantiate(store, module)
    start = instance.exports(store)["_start"]
    try:
        start(store)
    except wasmtime.ExitTrap as exit_trap:
        return exit_trap.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
