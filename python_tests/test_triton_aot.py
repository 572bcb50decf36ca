"""Ahead-of-time compilation of every Triton kernel configuration for sm_90, with no GPU needed.

Triton's interpreter (TRITON_INTERPRET=1, set by conftest when there is no GPU) accepts code that the
real compiler may reject, so every configuration the launchers can pick
(``bisam_kernels.ops.row_loss.aot_specializations()``) is compiled here with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``, in a subprocess where TRITON_INTERPRET is unset. Registers, local memory
(spills) and shared memory of each come from ``cuobjdump -res-usage`` on the cubin; the table for
bench/notes/bisam_loss_kernels.md is printed by

    python python_tests/test_triton_aot.py
"""

import concurrent.futures
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump():
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _compile_one(spec: dict) -> dict:
    """Compile one specialization for sm_90 (runs in a worker process without TRITON_INTERPRET)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from bisam_kernels.ops.row_loss import kernels

    fn = getattr(kernels, spec["kernel"])
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec["aligned"]}
    target = GPUTarget("cuda", 90, 32)
    options = triton.compiler.make_backend(target).parse_options({"num_warps": spec["num_warps"]})
    constexprs = {(fn.arg_names.index(k),): v for k, v in spec["constexprs"].items()}  # (index,) keys: Triton >= 3.3
    src = triton.compiler.ASTSource(fn=fn, signature=spec["signature"], constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=target, options=options.__dict__)
    result = {"label": spec["label"], "regs": None, "local": None, "stack": None, "shared": None}
    tool = _cuobjdump()
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        match = _RESOURCES.search(out)
        if match:
            regs, stack, shared, local = map(int, match.groups())
            result.update(regs=regs, stack=stack, shared=shared, local=local)
    result["shared"] = result["shared"] if result["shared"] is not None else kernel.metadata.shared
    return result


def compile_all(workers: int | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    from bisam_kernels.ops import row_loss  # here: a worker imports triton only after its environment is set

    specs = row_loss.aot_specializations()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_compile_one, specs))


def markdown(results: list[dict]) -> str:
    lines = ["| kernel configuration | registers / thread | spill stack (bytes) | local (bytes) | static shared (bytes) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| `{r['label']}` | {r['regs']} | {r['stack']} | {r['local']} | {r['shared']} |")
    return "\n".join(lines)


def test_every_kernel_configuration_compiles_for_sm90(tmp_path):
    from conftest import major_minor  # not at module level: run as a script, this file must not load conftest

    triton = pytest.importorskip("triton")
    # No spills with Triton >= 3.8 (pinned). Triton 3.6 (its code generation and bundled ptxas 12.8)
    # spills 24 bytes in one configuration, tolerated there for it alone: stored in the prologue and
    # reloaded between the two column loops, outside both.
    old_triton = major_minor(triton.__version__) < (3, 8)
    tolerated = {"_bisam_loss_kernel[ROWS=1, BLOCK_K=4096, SINGLE=False, PHI=1, warps=16] fp32/i32 unaligned": 32}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a fresh cache: the compiler really runs
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads(proc.stdout)
    from bisam_kernels.ops import row_loss

    assert [r["label"] for r in results] == [s["label"] for s in row_loss.aot_specializations()]
    for r in results:
        if r["regs"] is not None:
            max_stack = tolerated.get(r["label"], 0) if old_triton else 0
            assert r["local"] == 0 and r["stack"] <= max_stack, f"{r['label']} spills: {r}"
            assert 0 < r["regs"] <= 255


if __name__ == "__main__":
    out = compile_all()
    print(json.dumps(out) if "--json" in sys.argv else markdown(out))
