"""Read facts out of a compiled kernel without a GPU: global load/store widths per kernel argument from the
PTX, and registers / spills / shared and local memory from the cubin and the ptxas log.

PTX access widths: every ``ld.global`` / ``st.global`` is attributed to the kernel's pointer argument its
address is computed from. The address register is traced back through its defining instructions (``add``,
``mad.wide``, ``cvt``, ``selp``, ...) to the ``ld.param`` of a 64-bit argument; values that were themselves
loaded from global memory (the per-row slot index) end the trace, so a table row addressed by a loaded slot is
attributed to the table pointer, not to the slot pointer. The width of an access is vector count x element
bits (``ld.global.v4.b32`` = 128 bits, ``ld.global.b16`` = 16 bits).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

_REG = re.compile(r"%[A-Za-z_][\w$]*")
_PARAM = re.compile(r"\[\s*(\w+_param_(\d+))\s*\]")
_ADDR = re.compile(r"\[\s*(%[\w$]+)")
_MEM = re.compile(r"^(ld|st)\.global((?:\.[\w:]+)*)$")
_TYPE_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16,
              "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64,
              "b128": 128}


class PTXAnalysisError(RuntimeError):
    pass


def _statements(ptx: str):
    """(opcode, operand text) of every instruction: directives, labels, comments and predicates stripped."""
    lines = []
    for ln in ptx.splitlines():
        ln = ln.split("//", 1)[0].strip()
        if ln and not ln.startswith("."):
            lines.append(ln)
    for raw in " ".join(lines).split(";"):
        text = re.sub(r"^(?:[\w$]+:\s*|[(){}]\s*)+", "", raw.strip()).strip()
        if not text:
            continue
        text = re.sub(r"^@!?%[\w$]+\s+", "", text)
        parts = text.split(None, 1)
        yield parts[0], (parts[1] if len(parts) > 1 else "")


def _split_dst(op: str, operands: str) -> tuple[list[str], list[str]]:
    """(registers written, registers read) of one instruction."""
    if op.startswith("st.") or op.startswith("bar") or op.startswith("ret") or op.startswith("bra"):
        return [], _REG.findall(operands)
    if operands.startswith("{"):
        end = operands.index("}")
        return _REG.findall(operands[:end]), _REG.findall(operands[end + 1:])
    head, _, rest = operands.partition(",")
    return _REG.findall(head), _REG.findall(rest)


def access_widths(ptx: str, arg_names: list[str]) -> list[dict]:
    """Every global access of the PTX as ``{"kind": "load"|"store", "bits": int, "args": [names]}``.

    ``arg_names``: the kernel's runtime (non-constexpr) arguments in order: PTX parameter N is the N-th.
    """
    defs: dict[str, set] = {}  # reg -> registers it was computed from, or {("param", i)} / {("loaded",)}
    accesses = []
    for op, operands in _statements(ptx):
        m = _MEM.match(op)
        dst, src = _split_dst(op, operands)
        if op.startswith("ld.param"):
            p = _PARAM.search(operands)
            for r in dst:
                defs.setdefault(r, set()).add(("param", int(p.group(2))) if p else ("other",))
            continue
        if m:
            mods = m.group(2).split(".")[1:]
            vec = next((int(x[1:]) for x in mods if re.fullmatch(r"v\d+", x)), 1)
            tbits = next((_TYPE_BITS[x] for x in reversed(mods) if x in _TYPE_BITS), None)
            if tbits is None:
                raise PTXAnalysisError(f"cannot read the element type of `{op}`")
            addr = _ADDR.search(operands)
            accesses.append({"kind": "load" if m.group(1) == "ld" else "store", "bits": vec * tbits,
                             "addr": addr.group(1) if addr else None, "op": op})
            for r in dst:
                defs.setdefault(r, set()).add(("loaded",))
            continue
        if op.startswith("ld.") or op.startswith("atom"):
            for r in dst:
                defs.setdefault(r, set()).add(("loaded",))
            continue
        for r in dst:
            defs.setdefault(r, set()).update(src)

    def roots(reg: str) -> set[int]:
        seen, stack, out = set(), [reg], set()
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            for d in defs.get(r, ()):
                if isinstance(d, tuple):
                    if d[0] == "param":
                        out.add(d[1])
                elif d != r:
                    stack.append(d)
        return out

    result = []
    for a in accesses:
        idx = sorted(roots(a["addr"])) if a["addr"] else []
        names = []
        for i in idx:
            if i >= len(arg_names):
                continue  # Triton's own trailing scratch-buffer parameters
            names.append(arg_names[i])
        result.append({"kind": a["kind"], "bits": a["bits"], "args": names, "op": a["op"]})
    return result


def ptxas_facts(log: str) -> dict:
    """Registers, stack and spill bytes from the ``ptxas -v`` log Triton prints with ``dump_ptxas_log``."""
    out = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["regs"] = int(m.group(1))
    return out


def cuobjdump_path() -> Path:
    """The ``cuobjdump`` shipped in the triton wheel (``triton/backends/nvidia/bin``), found without importing
    triton (an import decides interpreter vs compiler for Triton's own library functions)."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        raise PTXAnalysisError("triton is not installed")
    p = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not p.is_file():
        raise PTXAnalysisError(f"no cuobjdump in the triton wheel (looked for {p}); bench.aot reads the cubin's "
                               "resource usage with it")
    return p


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(cuobjdump_path()), *flags, f.name], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise PTXAnalysisError(f"cuobjdump {' '.join(flags)} failed: {res.stderr.strip()[:300]}")
    return res.stdout


def cubin_resources(cubin: bytes, name: str) -> dict:
    """REG / STACK / SHARED / LOCAL of kernel ``name`` from ``cuobjdump --dump-resource-usage``."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    block = text.split(f"Function {name}:", 1)
    if len(block) != 2:
        raise PTXAnalysisError(f"cuobjdump shows no function {name!r}:\n{text[:500]}")
    line = block[1].strip().splitlines()[0]
    vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
    try:
        return {"regs": int(vals["REG"]), "stack": int(vals["STACK"]), "shared": int(vals["SHARED"]),
                "local": int(vals["LOCAL"])}
    except KeyError as e:
        raise PTXAnalysisError(f"cuobjdump resource line without {e}: {line!r}") from None


def sass_instructions(cubin: bytes) -> int:
    """Number of SASS instructions (``cuobjdump -sass``), trailing NOP padding excluded."""
    text = _cuobjdump(cubin, "-sass")
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+([^;]*);", text)
    while ops and ops[-1].strip().startswith(("NOP", "BRA")):
        ops.pop()
    return len(ops)
