"""Does a newer oneDNN make the train step faster? The same FFI source (ops/native/dnnl_conv.cc)
built against Debian sid's oneDNN 3.12.1 (`libdnnl3.6`, GNU OpenMP, the generation PyTorch
2.1x bundles) against the pinned `onednn-cpu-gomp` 3.2 wheel, each suite model's JAX train step
timed in fresh processes in turn.

    python -m benchmarks.probes.onednn_sid --dir /tmp/onednn312 [--models a,b] [--rounds 2]

Sid's build asks for glibc 2.38 and libstdc++ 14; of them it uses four symbols
(`__isoc23_strtol`, `__isoc23_strtoll`, `__cxa_call_terminate`,
`std::ios_base_library_init`). On an older system the copy here marks those three version
needs weak and the FFI library defines the four (COMPAT), so it loads on Debian bookworm. The
two packages come from deb.debian.org, checked against their SHA-256. The build lands in
DIR and is loaded through RESNET_JAX_DNNL_LIBRARY; the installed library is not touched.
Prints each side's median step per model and their ratio (3.2 / 3.12: above 1, 3.12 is
faster); docs/cpu_speed_log.md section 19 has the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import struct
import subprocess
import urllib.request
from pathlib import Path

POOL = "http://deb.debian.org/debian/pool/main/o/onednn/"
PACKAGES = {  # sid, 2026-12; the SHA-256 of its Packages index
    "libdnnl3.6_3.12.1+ds-3_amd64.deb":
        "796913149005e2babb84a0c4e5ef780b18f906d5dfb78049f31ae2ab87cc99f1",
    "libdnnl-dev_3.12.1+ds-3_amd64.deb":
        "05a4bc80a738128d3dad66a961950bfcce5d4c12718f2de0e7e41eade9cb15c0",
}
NEWER_VERSIONS = ("GLIBC_2.38", "GLIBCXX_3.4.32", "CXXABI_1.3.15")
COMPAT = r"""
#include <cstdlib>
#include <exception>
#include <ios>
extern "C" {
long __isoc23_strtol(const char* s, char** end, int base) { return std::strtol(s, end, base); }
long long __isoc23_strtoll(const char* s, char** end, int base) {
  return std::strtoll(s, end, base);
}
void __cxa_call_terminate(void*) noexcept { std::terminate(); }
}
namespace std {
void ios_base_library_init() { static ios_base::Init init; }
}
"""


def weaken_version_needs(path: Path, names: tuple[str, ...]) -> list[str]:
    """Sets VER_FLG_WEAK on the ELF64 library's version needs named `names` (the loader then
    only warns where the system's library lacks them); returns those it found."""
    data = bytearray(path.read_bytes())
    if data[:5] != b"\x7fELF\x02":
        raise ValueError(f"{path}: not an ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQI", data, shoff + i * shentsize) for i in range(shnum)]
    (verneed,) = [s for s in sections if s[1] == 0x6FFFFFFE]  # SHT_GNU_verneed
    strtab = sections[verneed[6]][4]
    found, off = [], verneed[4]
    while True:
        _, count, _, aux, nxt = struct.unpack_from("<HHIII", data, off)
        a = off + aux
        for _ in range(count):
            _, flags, _, name, anext = struct.unpack_from("<IHHII", data, a)
            end = data.index(b"\0", strtab + name)
            text = data[strtab + name:end].decode()
            if text in names:
                struct.pack_into("<H", data, a + 4, flags | 0x2)
                found.append(text)
            a += anext
        if not nxt:
            break
        off += nxt
    path.write_bytes(bytes(data))
    return found


def prepare(out: Path) -> Path:
    """Downloads and unpacks sid's oneDNN into `out`, makes it loadable here and builds the
    FFI library against it; returns the library's path."""
    from resnet_jax.ops import dnnl_conv

    out.mkdir(parents=True, exist_ok=True)
    root = out / "root"
    for name, sha in PACKAGES.items():
        deb = out / name
        if not deb.exists():
            with urllib.request.urlopen(POOL + name, timeout=120) as r:
                deb.write_bytes(r.read())
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        if digest != sha:
            raise RuntimeError(f"{name}: SHA-256 {digest}, expected {sha}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    prefix = root / "usr"
    libdir = prefix / "lib"
    libdir.mkdir(exist_ok=True)
    arch = prefix / "lib" / "x86_64-linux-gnu"
    for f in arch.iterdir():  # include/ and lib/, as build() expects
        target = libdir / f.name
        if not target.exists():
            target.symlink_to(f)
    real = next(f for f in arch.iterdir() if f.name.startswith("libdnnl.so.3.") and
                not f.is_symlink())
    print("weakened", weaken_version_needs(real, NEWER_VERSIONS), "in", real.name)
    compat = out / "compat.cc"
    compat.write_text(COMPAT)
    return dnnl_conv.build(out / "libresnet_jax_dnnl_conv.so", verbose=True, prefix=prefix,
                           extra_sources=(compat,))


def step_ms(model: str, library: Path | None, repeats: int) -> float:
    """The suite's JAX train step for `model` in a fresh process (with the FFI library at
    `library`, else the wheel's build), seconds -> ms."""
    from benchmarks.speed_suite import _run_worker

    change = {"RESNET_JAX_DNNL_LIBRARY": str(library) if library else None}
    return _run_worker("jax", model, repeats, 2, os.cpu_count(), change)["train_step_s"] * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the build goes")
    parser.add_argument("--models", default="cifar_resnet20,cifar_resnet56,resnet18,alexnet_owt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    library = prepare(args.dir)
    sides = {"3.2": None, "3.12": library}
    times = {m: {s: [] for s in sides} for m in args.models.split(",")}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for model in times:
            for side in order:
                times[model][side].append(step_ms(model, sides[side], args.repeats))
                print(f"round {r + 1} {model} oneDNN {side}: {times[model][side][-1]:.1f} ms",
                      flush=True)
    print(f"{'model':24s} {'3.2 ms':>9s} {'3.12 ms':>9s} {'3.2/3.12':>9s}")
    for model, t in times.items():
        a, b = statistics.median(t["3.2"]), statistics.median(t["3.12"])
        print(f"{model:24s} {a:9.1f} {b:9.1f} {a / b:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
