"""A local re-statement of ultralytics/yolov5's ``ComputeLoss`` (v7.0 / master), written from its
semantics operation by operation, as tensors of whole blocks (the way the original computes),
not per pair. The tests check ``yolo_kernels.reference`` against it; it is independent of the
package's code.

What it keeps from the original on purpose: targets scaled by a 7-entry gain, the ``[na, nt]``
fit mask, the five offset blocks selected by ``[5, M]`` masks (so the pair order is the
original's), ``%`` for the fractional parts, ``.long()`` truncation, the in-place clamp of the cell
indices before the box offsets are taken, ``bbox_iou`` with ``eps = 1e-7``, ``index_put`` of the
objectness target (last write wins on the CPU), ``gr`` mixed in only when ``< 1``, the per-layer
``balance`` and ``(lbox + lobj + lcls) * bs``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def bbox_iou_xywh(box1, box2, ciou=True, eps=1e-7):
    """CIoU (or plain IoU) of centre-xywh ``box1 [n, 4]`` and ``box2 [n, 4]`` -> ``[n, 1]``."""
    x1, y1, w1, h1 = box1.chunk(4, -1)
    x2, y2, w2, h2 = box2.chunk(4, -1)
    l1, r1, t1, b1 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    l2, r2, t2, b2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (r1.minimum(r2) - l1.maximum(l2)).clamp(0) * (b1.minimum(b2) - t1.maximum(t2)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not ciou:
        return iou
    cw = r1.maximum(r2) - l1.minimum(l2)
    ch = b1.maximum(b2) - t1.minimum(t2)
    c2 = cw**2 + ch**2 + eps
    rho2 = ((l2 + r2 - l1 - r1) ** 2 + (t2 + b2 - t1 - b1) ** 2) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def build_targets(p, targets, anchors, anchor_t):
    """``(tcls, tbox, indices, anch)`` per layer, as the original's ``build_targets``.
    ``anchors [nl, na, 2]`` in grid units."""
    na, nt, device = anchors.shape[1], targets.shape[0], targets.device
    tcls, tbox, indices, anch = [], [], [], []
    gain = torch.ones(7, device=device)
    anchor_col = torch.arange(na, device=device).float().view(na, 1).repeat(1, nt)
    targets = torch.cat((targets.repeat(na, 1, 1), anchor_col[..., None]), 2)  # [na, nt, 7]
    half = 0.5
    offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device).float() * half
    for i in range(len(p)):
        shape = p[i].shape
        gain[2:6] = torch.tensor(shape)[[3, 2, 3, 2]]
        t = targets * gain
        if nt:
            ratio = t[..., 4:6] / anchors[i][:, None]
            fits = torch.max(ratio, 1 / ratio).max(2)[0] < anchor_t
            t = t[fits]
            gxy = t[:, 2:4]
            gxi = gain[[2, 3]] - gxy
            left, up = ((gxy % 1 < half) & (gxy > 1)).T
            right, down = ((gxi % 1 < half) & (gxi > 1)).T
            select = torch.stack((torch.ones_like(left), left, up, right, down))
            t = t.repeat((5, 1, 1))[select]
            off = (torch.zeros_like(gxy)[None] + offsets[:, None])[select]
        else:
            t = targets[0]
            off = 0
        bc, gxy, gwh, a = t.chunk(4, 1)
        a, (b, c) = a.long().view(-1), bc.long().T
        gij = (gxy - off).long()
        gi, gj = gij.T  # views of gij: the in-place clamps below change gij too
        indices.append((b, a, gj.clamp_(0, shape[2] - 1), gi.clamp_(0, shape[3] - 1)))
        tbox.append(torch.cat((gxy - gij, gwh), 1))
        anch.append(anchors[i][a])
        tcls.append(c)
    return tcls, tbox, indices, anch


def compute_loss(p, targets, anchors, hyp, nc, balance, gr=1.0, sort_obj_iou=False):
    """The original ``ComputeLoss.__call__`` (no autobalance): ``((lbox + lobj + lcls) * bs, [3])``."""
    device = p[0].device  # the original's tensors live on the predictions' device
    bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp["cls_pw"]], device=device))
    bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp["obj_pw"]], device=device))
    eps = hyp.get("label_smoothing", 0.0)
    cp, cn = 1.0 - 0.5 * eps, 0.5 * eps
    lcls, lbox, lobj = (torch.zeros(1, device=device) for _ in range(3))
    tcls, tbox, indices, anch = build_targets(p, targets, anchors, hyp["anchor_t"])
    for i, pi in enumerate(p):
        b, a, gj, gi = indices[i]
        tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=device)
        n = b.shape[0]
        if n:
            pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, nc), 1)
            pxy = pxy.sigmoid() * 2 - 0.5
            pwh = (pwh.sigmoid() * 2) ** 2 * anch[i]
            iou = bbox_iou_xywh(torch.cat((pxy, pwh), 1), tbox[i]).squeeze()
            lbox += (1.0 - iou).mean()
            iou = iou.detach().clamp(0).type(tobj.dtype)
            if sort_obj_iou:
                j = iou.argsort(stable=True)
                b, a, gj, gi, iou = b[j], a[j], gj[j], gi[j], iou[j]
            if gr < 1:
                iou = (1.0 - gr) + gr * iou
            tobj[b, a, gj, gi] = iou
            if nc > 1:
                t = torch.full_like(pcls, cn)
                t[range(n), tcls[i]] = cp
                lcls += bce_cls(pcls, t)
        lobj += bce_obj(pi[..., 4], tobj) * balance[i]
    lbox *= hyp["box"]
    lobj *= hyp["obj"]
    lcls *= hyp["cls"]
    bs = p[0].shape[0]
    return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()
