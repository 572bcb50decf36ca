"""Shared test set-up. Triton's interpreter must be chosen before triton is first imported."""

import importlib.util
import os
import pathlib

import torch

if not torch.cuda.is_available():
    # No GPU: run the Triton kernels through the interpreter (docs/design.md section 5).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()))


def _patch_old_triton_interpreter():
    """Triton < 3.8's interpreter turns a scalar (a 1-element array) into an index with int(array), a
    TypeError since NumPy 2.4 (triton-lang/triton#9171): every range() bounded by a kernel argument
    fails. Re-set __index__ as Triton 3.8 does (int(array.squeeze())), after the interpreter's own."""
    try:
        import numpy
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    # Only where the bug bites, and only for the interpreters whose hook this wraps (3.x with scopes).
    if major_minor(triton.__version__) >= (3, 8) or major_minor(numpy.__version__) < (2, 4):
        return
    if not hasattr(interpreter, "_LangPatchScope"):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_old_triton_interpreter()

import pytest  # noqa: E402

_skip_without_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def requires_cuda(test):
    """A GPU test: marked `cuda` (bench/device_check.sh selects them with `-m cuda`), skipped without a GPU."""
    return pytest.mark.cuda(_skip_without_gpu(test))


# The CUDA case is listed everywhere (marked `cuda`), skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _skip_without_gpu])]


@pytest.fixture(params=DEVICES)
def device(request):
    """Every test taking `device` runs on the CPU and on the GPU (skipped when there is none)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs every run; the seed is printed (shown on failure) to replay one.
    seed = int(os.environ.get("BISAM_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed: BISAM_TEST_SEED={seed}")
    torch.manual_seed(seed)


class Route:
    """Reusable context: route CPU tensors through the Triton row kernels (interpreter) or not."""

    def __init__(self, triton: bool):
        self.triton = triton

    def __enter__(self):
        from bisam_kernels.ops import row_loss

        self._cm = row_loss.triton_on_cpu(self.triton)
        return self._cm.__enter__()

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


@pytest.fixture(params=["composite", "triton", pytest.param("cuda", marks=[pytest.mark.cuda, _skip_without_gpu])])
def backend(request):
    """(device, context) of the row-loss tests: the composite CPU path, the Triton kernels on the CPU
    (interpreter), CUDA."""
    if request.param == "composite":
        return "cpu", Route(False)
    if request.param == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set by conftest without a GPU)")
        return "cpu", Route(True)
    return "cuda", Route(False)


@pytest.fixture
def poison_row_buffers(monkeypatch):
    """Every buffer the row-loss launcher allocates starts as NaN (integers as -7), so an unwritten element
    fails."""
    from bisam_kernels.ops.row_loss import launch

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)

    monkeypatch.setattr(launch, "empty", empty)


@pytest.fixture(scope="session")
def load_example():
    """Imports examples/<name>.py as a module (the examples are scripts, not a package)."""
    examples = pathlib.Path(__file__).resolve().parents[1] / "examples"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, examples / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the examples set 1 thread


def compile_counting_graphs(fn, graphs: list):
    """torch.compile(fn, fullgraph=True, dynamic=True) with a backend that appends each graph it is given to
    ``graphs`` (and runs it eagerly): ``len(graphs)`` is the number of compilations."""
    def count(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=count, fullgraph=True, dynamic=True)


def assert_close(out, ref, rtol, what, floor=1e-7):
    """|out - ref| <= rtol * |ref| + atol elementwise, atol = floor * max(1, max |ref|) (the tensor's scale)."""
    out, ref = out.detach().double().cpu(), ref.double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    scale = max(1.0, ref.abs().max().item()) if torch.isfinite(ref).all() else 1.0
    torch.testing.assert_close(out, ref, rtol=rtol, atol=floor * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")
