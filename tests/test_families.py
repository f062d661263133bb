"""Every loss family through the inherited suite (``family_suite.py``): the YOLOv3 archive loss,
the YOLOv5-style loss and the anchor-free YOLOv8 loss, each over its fused backends. What a
family does that the others do not is tested in its own file (``test_fused_loss.py``,
``test_yolov5.py``, ``test_yolov8.py``, ``test_anchor_free_ops.py``)."""

from __future__ import annotations

import pytest
import torch
from anchor_free_cases import StandIn, grids_for, make_batch, make_preds
from family_suite import Case, FamilySuite
from helpers import duck_model, fused_backends, make_p, make_targets, random_anchors
from test_yolov5 import small_problem

import yolo_kernels as yk
from yolo_kernels import library, yolov8
from yolo_kernels.anchor.backends import BACKENDS as ANCHOR_BACKENDS
from yolo_kernels.anchor.backends import run_backend
from yolo_kernels.anchor.options import LossOptions
from yolo_kernels.anchor_free import reference as anchor_free_reference
from yolo_kernels.anchor_free.options import DetectionOptions

OPS = torch.ops.yolo_kernels


def pytest_generate_tests(metafunc):
    if metafunc.cls is not None and issubclass(metafunc.cls, FamilySuite) and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend, device", metafunc.cls.backends())


def head_view(p: torch.Tensor) -> torch.Tensor:
    """``p`` [bs, na, ny, nx, no] with the same values, as the view of a convolution's output that
    a YOLO head returns (not contiguous)."""
    bs, na, ny, nx, no = p.shape
    conv = p.permute(0, 1, 4, 2, 3).contiguous().view(bs, na * no, ny, nx)
    return conv.view(bs, na, no, ny, nx).permute(0, 1, 3, 4, 2)


def float64_problem(seed, nas, grids, nt, device, nc=3):
    """A small float64 problem for gradcheck: anchors, targets (one duplicated), leaves of ``p``."""
    g = torch.Generator().manual_seed(seed)
    anchors = [a.double().to(device) for a in random_anchors(nas, g, lo=0.5, hi=2.0)]
    targets = make_targets(nt, 2, nc, g, lo=0.2, hi=0.6, dtype=torch.float64)
    targets = torch.cat((targets, targets[:1])).to(device)
    p = [x.to(device).requires_grad_() for x in make_p(2, nas, grids, nc, g, dtype=torch.float64)]
    return anchors, targets, p


class TestYOLOv3(FamilySuite):
    """``yolo_kernels.compute_loss`` (the archive drop-in) on a duck-typed model: two layers,
    duplicates, a non-default gr and box loss."""

    backends = staticmethod(fused_backends)
    OPTIONS = LossOptions(nc=5, gr=0.6, box_loss="ciou", fl_gamma=0.0)

    def problem(self, gen, dtype=torch.float32, empty=False):
        nas, grids = [3, 2], [(4, 6), (3, 3)]
        anchors = random_anchors(nas, gen, lo=0.3, hi=3.0)
        targets = make_targets(8, 2, 5, gen)
        targets = torch.cat((targets, targets[:2]))[: 0 if empty else None]
        return Case(make_p(2, nas, grids, 5, gen, dtype=dtype), (targets, anchors, self.OPTIONS))

    def strided(self, case):
        return Case([head_view(p) for p in case.preds], case.rest)

    def call(self, backend, device, case, preds):
        targets, anchors, o = case.rest
        model = duck_model([a.to(device) for a in anchors], o.nc, hyp=o.as_hyp(), gr=o.gr)
        extra = dict(box_loss=o.box_loss, reduction=o.reduction, label_smoothing=o.label_smoothing)
        loss, items = yk.compute_loss(preds, targets.to(device), model, backend=backend, **extra)
        return loss, torch.cat((loss, items))

    def gradchecks(self, backend, device):
        nc = 3
        anchors, targets, p = float64_problem(7, [2, 3], [(2, 3), (3, 2)], 5, device, nc)
        impl = ANCHOR_BACKENDS[backend]
        # gr = 0: the objectness target is 1, not a (detached) function of p
        for options in (
            LossOptions(nc=nc, gr=0.0),
            LossOptions(nc=nc, gr=0.0, fl_gamma=1.5, reduction="sum", box_loss="diou"),
        ):
            yield (lambda *ps, o=options: impl.loss(list(ps), targets, anchors, o)[0]), p


class TestYOLOv5(FamilySuite):
    """The YOLOv5-style loss through ``run_backend`` (what ``ComputeLoss`` and ``YOLOv5Loss`` call):
    the neighbour cells' edge cases, a layer balance, sort_obj_iou."""

    backends = staticmethod(fused_backends)
    OPTIONS = LossOptions(nc=5, family="yolov5", box_loss="ciou", box=0.05, cls=0.5, obj=1.0, sort_obj_iou=True)

    def problem(self, gen, dtype=torch.float32, empty=False):
        p, targets, anchors = small_problem(nc=5, seed=int(torch.randint(1 << 16, (1,), generator=gen)))
        targets = targets[: 0 if empty else None]
        return Case([x.to(dtype) for x in p], (targets, anchors, torch.tensor([4.0, 0.7])))

    def strided(self, case):
        return Case([head_view(p) for p in case.preds], case.rest)

    def call(self, backend, device, case, preds):
        targets, anchors, balance = case.rest
        loss, items, layer_obj, _ = run_backend(
            preds, targets.to(device), anchors, self.OPTIONS, backend, True, balance.to(device)
        )
        return loss, torch.cat((loss, items, layer_obj))

    def gradchecks(self, backend, device):
        nc = 3
        anchors, targets, p = float64_problem(2, [2, 2], [(3, 3), (2, 3)], 4, device, nc)
        impl = ANCHOR_BACKENDS[backend]
        balance = torch.tensor([4.0, 0.5], dtype=torch.float64, device=device)
        # gr = 0: the objectness target is 1, not a (detached) function of p; no CIoU (its alpha is detached)
        for options in (
            LossOptions(nc=nc, family="yolov5", gr=0.0, box_loss="diou"),
            LossOptions(nc=nc, family="yolov5", gr=0.0, fl_gamma=1.5, box_loss="giou", label_smoothing=0.1),
        ):
            yield (lambda *ps, o=options: impl.loss(list(ps), targets, anchors, o, balance)[0]), p


def _anchor_free_backends():
    reason = library.cpu_kernels_unavailable_reason(torch.device("cpu"))
    return [pytest.param("cpp", "cpu", id="cpp", marks=pytest.mark.skipif(reason is not None, reason=str(reason)))]


class TestYOLOv8(FamilySuite):
    """``yolo_kernels.yolov8.DetectionLoss`` on a stand-in model: three levels at 64 x 96, an image
    with a duplicated box, class weights, non-default gains."""

    backends = staticmethod(_anchor_free_backends)
    NC, REG_MAX, GRIDS = 5, 16, grids_for(64, 96)

    def model(self):
        model = StandIn(nc=self.NC, reg_max=self.REG_MAX, box=5.0, cls=0.7, dfl=1.2)
        model.class_weights = torch.linspace(0.5, 1.5, self.NC)
        return model

    def problem(self, gen, dtype=torch.float32, empty=False):
        preds = make_preds(2, self.GRIDS, self.NC, self.REG_MAX, gen, dtype=dtype)
        batch = make_batch([0, 0] if empty else [6, 4], self.NC, gen)
        for key in batch:  # the last box again, in the same image
            batch[key] = torch.cat((batch[key], batch[key][-1:]))
        return Case([preds["boxes"], preds["scores"]], (preds["feats"], batch))

    def strided(self, case):
        # the predictions as slices of the head's concatenated [bs, 4 * reg_max + nc, A] output
        both = torch.cat(case.preds, 1)
        return Case(list(both.split([4 * self.REG_MAX, self.NC], 1)), case.rest)

    def call(self, backend, device, case, preds):
        feats, batch = case.rest
        criterion = yolov8.DetectionLoss(self.model(), backend=backend)
        loss, items = criterion({"boxes": preds[0], "scores": preds[1], "feats": feats}, batch)
        return loss, torch.cat((loss, torch.stack([v.reshape(()) for v in items.values()]).to(loss.dtype)))

    def gradchecks(self, backend, device):
        """The op with the assignment held (the original computes it without a gradient) and the
        box gain 0 (CIoU's aspect weight is detached, as in the original: its gradient is compared
        with the reference's autograd in ``test_anchor_free_ops.py``)."""
        g = torch.Generator().manual_seed(3)
        grids, nc = [(4, 4), (2, 2)], 3
        for reg_max in (16, 1):
            options = DetectionOptions(nc=nc, reg_max=reg_max, strides=(8.0, 16.0))
            preds = make_preds(2, grids, nc, reg_max, g, dtype=torch.float64)
            batch = make_batch([3, 2], nc, g, lo=0.2, hi=0.6, dtype=torch.float64)
            ref = anchor_free_reference
            image_hw = ref.image_size(grids, options.strides, torch.float64, torch.device("cpu"))
            labels, gt_boxes = ref.pad_targets(batch["batch_idx"], batch["cls"], batch["bboxes"], 2, image_hw.flip(0))
            labels, flat, strides = labels.squeeze(-1).long(), [n for grid in grids for n in grid], [8.0, 16.0]

            assigned, target = OPS.tal_assign(
                preds["boxes"], preds["scores"], labels, gt_boxes, flat, strides, 10, None, 0.5, 6.0, 16.0
            )
            assert (assigned >= 0).sum() > 3
            weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)

            args = (labels, gt_boxes, assigned, target, weights, flat, strides, 0.0, 0.5, 1.5)
            yield (
                (lambda b, s, args=args: OPS.detection_loss(b, s, *args)),
                (
                    preds["boxes"].requires_grad_(),
                    preds["scores"].requires_grad_(),
                ),
            )
