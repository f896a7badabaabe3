"""Checks that each CPU ISA pass of a linked library uses no instruction above its ISA: no VEX- or
EVEX-encoded instruction (AVX and later, whatever the register width: a -mfma scalar `vfmadd231ss` too) in
DEFAULT code, nothing AVX-512-only in AVX2 code (zmm and mask registers, xmm/ymm 16-31, embedded
broadcasts). A flag or an intrinsic leaking across passes, or an inline function several passes
instantiate whose higher-ISA copy the linker kept, would crash with SIGILL on a CPU without that ISA.

It reads the library as shipped (by default the extension setup.py built, medattn_kernels/_C*.so), not
per-pass objects: each function is attributed to a pass by the namespace in its demangled name. The
kernels live in `medattn::CPU_CAPABILITY` and ATen's vector types in `at::vec::CPU_CAPABILITY`, so a
vector pass's code, its lambdas and its OpenMP outlined bodies all carry `::AVX2::` or `::AVX512::`;
everything else (the DEFAULT pass, the registration and dispatch code, and merged inline functions) must
run on any x86-64. One exception: GCC's local clones of a library function (`std::vector<float>::vector(...)
[clone .constprop.0]`) carry no pass namespace but are private to the object that made them, so they run
only where their pass runs; they are held to the DEFAULT register rule but not to its encoding rule (a
vector pass's clone is VEX-encoded, and calling it from a vector pass is right).

Usage: python tools/check_isa_library.py [LIBRARY]
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
# pass -> (what its code must not contain, the widest register it is expected to use somewhere)
WIDE_REGISTERS = r"%[yz]mm|%k[0-7]\b"
# an AVX mnemonic: every VEX/EVEX instruction starts with v; verr / verw are the only older ones that do
VEX_MNEMONIC = r"^\s*[0-9a-f]+:\s+v(?!err\b|erw\b)[a-z0-9]+\b"
AVX512_ONLY = r"%zmm|%k[0-7]\b|%[xy]mm(?:1[6-9]|2[0-9]|3[01])\b|\{1to[0-9]+\}"
RULES = {
    "DEFAULT": (re.compile(f"{WIDE_REGISTERS}|{VEX_MNEMONIC}"), None),
    "AVX2": (re.compile(AVX512_ONLY), re.compile(r"%ymm")),
    "AVX512": (None, re.compile(r"%zmm")),
}
LOCAL_CLONE_RULE = re.compile(WIDE_REGISTERS)  # see the top: local clones skip DEFAULT's encoding rule
LOCAL_CLONE = re.compile(r"\[clone \.")


def pass_of(function: str) -> str:
    # objdump -C leaves some names mangled (OpenMP outlined bodies, `<mangled>._omp_fn.0`): there the
    # namespace reads as its length-prefixed identifier
    if "::AVX512::" in function or "6AVX512" in function:
        return "AVX512"
    if "::AVX2::" in function or "4AVX2" in function:
        return "AVX2"
    return "DEFAULT"


def check(library: str) -> int:
    functions = {name: 0 for name in RULES}
    using_widest = {name: 0 for name in RULES}
    violations = []
    current, isa, flagged, widest_seen = None, None, False, False
    proc = subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", "-C", library], stdout=subprocess.PIPE,
                            text=True, errors="replace")
    for line in proc.stdout:
        m = FUNCTION.match(line)
        if m:
            current, isa, flagged, widest_seen = m.group(1), pass_of(m.group(1)), False, False
            functions[isa] += 1
            continue
        if current is None:
            continue
        forbidden, widest = RULES[isa]
        if isa == "DEFAULT" and LOCAL_CLONE.search(current):
            forbidden = LOCAL_CLONE_RULE
        hit = forbidden.search(line) if forbidden is not None and not flagged else None
        if hit:
            what = hit.group(0).split()[-1]  # the register, or the mnemonic without its address
            violations.append(f"{isa} code uses {what}: {current[:200]}\n    {line.strip()}")
            flagged = True
        if widest is not None and not widest_seen and widest.search(line):
            using_widest[isa] += 1
            widest_seen = True
    if proc.wait() != 0:
        print(f"check_isa_library: objdump failed on {library}", file=sys.stderr)
        return 2
    for v in violations:
        print(v, file=sys.stderr)
    status = 1 if violations else 0
    for isa, count in functions.items():
        if count == 0:
            print(f"{isa} pass: not in this library")
            continue
        widest = RULES[isa][1]
        note = f", {using_widest[isa]} of them use {widest.pattern[1:]}" if widest is not None else ""
        print(f"{isa} pass: {count} functions{note}")
        if widest is not None and using_widest[isa] == 0:
            # the attribution by namespace would be broken: the pass's code is not where we look
            print(f"check_isa_library: no {isa} function uses {widest.pattern[1:]}", file=sys.stderr)
            status = 1
    if functions["DEFAULT"] == 0:
        print("check_isa_library: no DEFAULT code found", file=sys.stderr)
        status = 1
    print(f"check_isa_library: {os.path.relpath(library, ROOT)}: "
          + ("no instruction above its pass" if status == 0 else "FAILED"))
    return status


def main(argv) -> int:
    if shutil.which("objdump") is None:
        print("check_isa_library: skipped, toolchain missing: objdump not found")
        return 0
    if argv:
        library = argv[0]
    else:
        built = sorted(glob.glob(os.path.join(ROOT, "medattn_kernels", "_C*.so")))
        if not built:
            print("check_isa_library: no built extension medattn_kernels/_C*.so (make build first)", file=sys.stderr)
            return 2
        library = built[0]
    return check(library)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
