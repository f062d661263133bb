"""The tests every loss family inherits (the pattern of torchvision's ``RoIOpTester``): a family
says how to make a problem, how to call its loss with a backend, and how to gradcheck it; the
comparisons with the reference over the fused backends, half precision, strided predictions,
empty targets, determinism, the backward contract, forward-only calls and non-finite
predictions are written once, here.

A family is a subclass of ``FamilySuite`` whose name starts with ``Test`` (``test_families.py``)
and defines:

* ``backends()``: the ``(backend, device)`` pytest params of its fused backends that can run here;
* ``problem(gen, dtype, empty=False)``: a ``Case`` (the prediction tensors the gradient reaches,
  in float64 or ``dtype``, and whatever else the loss takes);
* ``strided(case)``: the same case with non-contiguous predictions (e.g. the head's view);
* ``call(backend, device, case, preds)``: the loss on ``preds`` (on ``device``) as the public API
  computes it: ``(loss to backpropagate, a 1-D float tensor of every value the API returns)``;
* ``gradchecks(backend, device)``: ``(function, float64 inputs)`` pairs for
  ``torch.autograd.gradcheck`` (the family holds what the original detaches).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch

HALF = [torch.float16, torch.bfloat16]


class Case(NamedTuple):
    preds: list[torch.Tensor]
    rest: Any


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in HALF else t


class FamilySuite:
    """The inherited tests; ``pytest_generate_tests`` (``test_families.py``) parametrises
    ``backend, device`` with the family's ``backends()``."""

    # --------------------------------------------------------------------------- the family's hooks

    @staticmethod
    def backends() -> list:
        raise NotImplementedError

    def problem(self, gen: torch.Generator, dtype: torch.dtype = torch.float32, empty: bool = False) -> Case:
        raise NotImplementedError

    def strided(self, case: Case) -> Case:
        raise NotImplementedError

    def call(self, backend: str, device: str, case: Case, preds: list[torch.Tensor]):
        raise NotImplementedError

    def gradchecks(self, backend: str, device: str):
        raise NotImplementedError

    # ------------------------------------------------------------------------------ shared helpers

    def run(self, backend, device, case: Case, grad=True, scale=1.0):
        """The values and (with ``grad``) the gradients of ``scale * loss`` on fresh leaves, on the CPU."""
        leaves = [p.detach().to(device).clone().requires_grad_(grad) for p in case.preds]
        loss, values = self.call(backend, device, case, leaves)
        if grad:
            (loss * scale).sum().backward()
        grads = [x.grad.cpu() if x.grad is not None else torch.zeros_like(x).cpu() for x in leaves] if grad else []
        return loss.detach().cpu(), values.detach().cpu(), grads

    def assert_matches_reference(self, backend, device, case: Case, rtol=1e-5, rtol_grad=1e-4, scale=1.0):
        """``backend`` equals the reference on the CPU, on the same values upcast to float32 for half
        precision: values to ``rtol``, gradients to ``rtol_grad`` of their largest entry, in the
        predictions' dtype."""
        _, values, grads = self.run(backend, device, case, scale=scale)
        reference = Case([_upcast(p) for p in case.preds], case.rest)
        _, want, want_grads = self.run("reference", "cpu", reference, scale=scale)
        torch.testing.assert_close(values, want, rtol=rtol, atol=rtol * float(want.abs().max().clamp(min=1e-30)))
        for p, g, w in zip(case.preds, grads, want_grads):
            assert g.dtype == p.dtype and g.shape == p.shape
            scale_g = float(w.abs().max().clamp(min=1e-30))
            torch.testing.assert_close(g.to(w.dtype), w, rtol=rtol_grad, atol=rtol_grad * scale_g)
        return values, grads

    # ------------------------------------------------------------------------- the inherited tests

    def test_parity(self, backend, device, gen):
        self.assert_matches_reference(backend, device, self.problem(gen))

    def test_empty_targets(self, backend, device, gen):
        values, _ = self.assert_matches_reference(backend, device, self.problem(gen, empty=True))
        assert torch.isfinite(values).all()

    @pytest.mark.parametrize("dtype", HALF, ids=str)
    def test_half_precision(self, backend, device, dtype, gen):
        # the values in float32 on the same values upcast; the gradient comes back rounded to dtype
        values, grads = self.assert_matches_reference(backend, device, self.problem(gen, dtype), rtol_grad=1e-2)
        assert values.dtype == torch.float32 and all(g.dtype == dtype for g in grads)

    def test_strided_predictions(self, backend, device, gen):
        case = self.strided(self.problem(gen))
        assert not all(p.is_contiguous() for p in case.preds)
        self.assert_matches_reference(backend, device, case)

    def test_float64_gradcheck(self, backend, device):
        for fn, inputs in self.gradchecks(backend, device):
            assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=backend == "triton")

    def test_backward_scales_by_grad_output(self, backend, device, gen):
        self.assert_matches_reference(backend, device, self.problem(gen), scale=-2.5)
        # retain_graph: each further backward adds the same gradient again (a saved gradient is
        # never handed out as .grad and then accumulated into in place)
        case = self.problem(gen)
        leaves = [p.to(device).clone().requires_grad_() for p in case.preds]
        loss = self.call(backend, device, case, leaves)[0].sum()
        loss.backward(retain_graph=True)
        once = [x.grad.clone() for x in leaves]
        loss.backward(retain_graph=True)
        loss.backward()
        for x, g in zip(leaves, once):
            torch.testing.assert_close(x.grad, 3 * g)

    def test_forward_only(self, backend, device, gen):
        case = self.problem(gen)
        leaves = [p.to(device).requires_grad_() for p in case.preds]
        with torch.no_grad():
            loss, values = self.call(backend, device, case, leaves)
        assert loss.grad_fn is None and values.grad_fn is None
        torch.testing.assert_close(values, self.call(backend, device, case, leaves)[1], rtol=0, atol=0)

    def test_bitwise_deterministic(self, backend, device, gen):
        case = self.problem(gen)
        first, second = (self.run(backend, device, case) for _ in range(2))
        assert torch.equal(first[1], second[1])
        assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))

    @pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
    def test_nonfinite_prediction_gives_nonfinite_loss(self, backend, device, value, gen):
        """NaN or infinite predictions (each prediction tensor in turn) give a non-finite loss, as
        the originals do: training loops stop on it. (Where one logit alone must do so is each
        family's own test.)"""
        case = self.problem(gen)
        for i in range(len(case.preds)):
            preds = [p.clone() for p in case.preds]
            preds[i].fill_(value)
            loss, values, _ = self.run(backend, device, Case(preds, case.rest), grad=False)
            assert not torch.isfinite(loss).all(), (i, loss)
