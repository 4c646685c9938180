"""KernelOpTestBase: the checks that every escape_fast kernel op gets on every
backend (in the style of torchvision's test/test_ops.py).

A subclass per op names the op (``op``, for conftest.kernel_backends), declares
its case lists and fills in the input hooks; it inherits

* test_matches_reference: the kernel against escape_fast.reference on random
  inputs over the op's shapes, masks and parameters (``cases``), both dtypes;
* test_non_contiguous: the same comparison on strided inputs;
* test_empty: empty inputs (``empty_cases``) give empty results that agree
  with the reference;
* test_gradcheck: float64 gradcheck through the public op's autograd;
* test_opcheck: torch.library.opcheck of the registered ops;
* test_compile: torch.compile against eager, gradients included where an input
  requires them;
* test_deterministic: repeated calls give bitwise-identical results.

A check that does not apply to an op is switched off in its subclass with
``test_<name> = None`` (pytest collects only functions). Methods that a
subclass adds get the same parametrization by argument name: ``backend_device``
(every backend of ``op``), ``case``, ``empty_case``, ``opcheck_dtype``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import kernel_backends, tol

from escape_fast import ops

DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64"}

# opcheck's default set of checks
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# Under TRITON_INTERPRET=1, torch.library.wrap_triton hands back the raw
# interpreted kernel, which then runs (and fails) on the fake tensors of the
# fake / AOT checks and of torch.compile instead of being traced: those run
# for Triton on CUDA only.
OPCHECK_UTILS_INTERPRETED = ("test_schema", "test_autograd_registration")
NO_FAKE_TRACE = "Triton ops are not traceable with fake tensors under TRITON_INTERPRET=1 (CUDA only)"


def interpreted(backend_device) -> bool:
    """Triton on the CPU: the interpreter, slow and without fake-tensor tracing."""
    backend, device = backend_device
    return backend == "triton" and device.type == "cpu"


def tensors(values) -> list[torch.Tensor]:
    """The tensors of an op's output or argument tuple."""
    if torch.is_tensor(values):
        return [values]
    return [v for v in values if torch.is_tensor(v)]


def _fresh(x):
    """A leaf copy of x, requiring grad like x, so eager and compiled runs
    accumulate their gradients apart."""
    return x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x


class KernelOpTestBase:
    """Common checks of one kernel op; see the module docstring.

    An *inputs* tuple holds the op's arguments in the order ``run`` and
    ``reference`` take them (tensors and parameters such as a kernel size).
    """

    op: str  # the op's name in escape_fast.ops (for kernel_backends)
    cases: dict = {"random": None}  # test_matches_reference: id -> case passed to make_inputs
    empty_cases: dict = {}  # test_empty: id -> case passed to empty_inputs
    opcheck_dtypes = (torch.float32,)
    compile_options: dict = {}  # torch.compile keyword arguments
    compile_tol = {"rtol": 0.0, "atol": 0.0}

    def pytest_generate_tests(self, metafunc):
        args = metafunc.fixturenames
        if "backend_device" in args:
            metafunc.parametrize("backend_device", kernel_backends(self.op))
        if "case" in args:
            metafunc.parametrize("case", list(self.cases.values()), ids=list(self.cases))
        if "empty_case" in args:
            metafunc.parametrize("empty_case", list(self.empty_cases.values()), ids=list(self.empty_cases))
        if "opcheck_dtype" in args:
            metafunc.parametrize("opcheck_dtype", self.opcheck_dtypes, ids=[DTYPE_IDS[d] for d in self.opcheck_dtypes])

    # ----------------------------------------------------------------------
    # hooks
    # ----------------------------------------------------------------------
    def make_inputs(self, backend_device, dtype, case) -> list[tuple]:
        """Inputs of one case (its list of shapes, say) on the backend's device."""
        raise NotImplementedError

    def run(self, backend_device, *inputs):
        """The op on ``backend_device``'s backend."""
        raise NotImplementedError

    def reference(self, *inputs):
        """The pure-PyTorch result (escape_fast.reference)."""
        raise NotImplementedError

    def assert_matches(self, out, expected, inputs, dtype):
        """Compare ``run``'s output with ``reference``'s; may return a value
        for assert_all_matched."""
        torch.testing.assert_close(out, expected, **tol(dtype))

    def assert_all_matched(self, results, dtype):
        """A bound over all inputs of one case of test_matches_reference
        (``results``: what assert_matches returned for each)."""

    def non_contiguous_inputs(self, backend_device, dtype) -> list[tuple]:
        raise NotImplementedError

    def empty_inputs(self, backend_device, dtype, empty_case) -> tuple:
        raise NotImplementedError

    def grad_inputs(self, backend_device) -> list[tuple]:
        """(function, float64 inputs that require grad) pairs for gradcheck."""
        raise NotImplementedError

    def gradcheck_options(self, backend_device) -> dict:
        return {}

    def opcheck_inputs(self, backend_device, dtype) -> list[tuple]:
        """(registered op, arguments) pairs for opcheck."""
        raise NotImplementedError

    def compile_inputs(self, backend_device) -> tuple:
        """(function, arguments) compared compiled against eager."""
        raise NotImplementedError

    def deterministic_calls(self, backend_device) -> list[tuple]:
        """(function, arguments) pairs that must repeat bitwise; by default
        the op on the float32 inputs of the first case."""
        first = next(iter(self.cases.values()))
        run = functools.partial(self.run, backend_device)
        return [(run, inputs) for inputs in self.make_inputs(backend_device, torch.float32, first)]

    def kernel(self, backend_device, name: str | None = None):
        """The registered op ``name`` (default: this op) of the backend:
        torch.ops.escape_fast.<name> or torch.ops.escape_fast_triton.<name>."""
        return ops._kernel(name or self.op, backend_device[0])

    # ----------------------------------------------------------------------
    # checks
    # ----------------------------------------------------------------------
    def test_matches_reference(self, backend_device, case, dtype):
        results = []
        for inputs in self.make_inputs(backend_device, dtype, case):
            out = self.run(backend_device, *inputs)
            results.append(self.assert_matches(out, self.reference(*inputs), inputs, dtype))
        self.assert_all_matched(results, dtype)

    def test_non_contiguous(self, backend_device, dtype):
        for inputs in self.non_contiguous_inputs(backend_device, dtype):
            assert any(not t.is_contiguous() for t in tensors(inputs)), "no strided input"
            self.assert_matches(self.run(backend_device, *inputs), self.reference(*inputs), inputs, dtype)

    def test_empty(self, backend_device, empty_case, dtype):
        inputs = self.empty_inputs(backend_device, dtype, empty_case)
        out = self.run(backend_device, *inputs)
        assert all(t.numel() == 0 for t in tensors(out))
        self.assert_matches(out, self.reference(*inputs), inputs, dtype)

    def test_gradcheck(self, backend_device):
        for fn, inputs in self.grad_inputs(backend_device):
            assert all(t.dtype == torch.float64 and t.requires_grad for t in inputs)
            assert torch.autograd.gradcheck(fn, inputs, **self.gradcheck_options(backend_device))

    def test_opcheck(self, backend_device, opcheck_dtype):
        utils = OPCHECK_UTILS_INTERPRETED if interpreted(backend_device) else OPCHECK_UTILS
        for op, args in self.opcheck_inputs(backend_device, opcheck_dtype):
            torch.library.opcheck(op, args, test_utils=utils)

    def test_compile(self, backend_device):
        if interpreted(backend_device):
            pytest.skip(NO_FAKE_TRACE)
        fn, inputs = self.compile_inputs(backend_device)
        eager_in = [_fresh(x) for x in inputs]
        compiled_in = [_fresh(x) for x in inputs]
        torch._dynamo.reset()
        compiled = torch.compile(fn, **self.compile_options)
        want = fn(*eager_in)
        got = compiled(*compiled_in)
        torch.testing.assert_close(got, want, **self.compile_tol)
        leaves = [i for i, x in enumerate(inputs) if torch.is_tensor(x) and x.requires_grad]
        if leaves:
            want.sum().backward()
            got.sum().backward()
            for i in leaves:
                torch.testing.assert_close(compiled_in[i].grad, eager_in[i].grad, **self.compile_tol)

    def test_deterministic(self, backend_device):
        for fn, args in self.deterministic_calls(backend_device):
            first = tensors(fn(*args))
            for _ in range(3):
                again = tensors(fn(*args))
                assert len(again) == len(first) and all(map(torch.equal, again, first))
