"""The loss as the original ultralytics/yolov3 (v8, archive branch) wrote it, for timing only.

Transcribed from the seed document's walk-through, with only the two modern-PyTorch crashes
mended the least invasive way (the anchor ``arange`` is created on the targets' device; the
cell indices are clamped with integer bounds). It is the baseline the reference must not be
slower than; it is never used for correctness (the reference is the oracle).
"""

import torch
import torch.nn as nn

from yolo_kernels.reference import bbox_iou, wh_iou


def build_targets(p, targets, model):
    nt = targets.shape[0]
    tcls, tbox, indices, anch = [], [], [], []
    gain = torch.ones(6, device=targets.device)
    for i, j in enumerate(model.yolo_layers):
        anchors = model.module_list[j].anchor_vec
        gain[2:] = torch.tensor(p[i].shape)[[3, 2, 3, 2]]
        na = anchors.shape[0]
        at = torch.arange(na, device=targets.device).view(na, 1).repeat(1, nt)
        a, t, offsets = [], targets * gain, 0
        if nt:
            j = wh_iou(anchors, t[:, 4:6]) > model.hyp["iou_t"]
            a, t = at[j], t.repeat(na, 1, 1)[j]
        b, c = t[:, :2].long().T
        gxy = t[:, 2:4]
        gwh = t[:, 4:6]
        gij = (gxy - offsets).long()
        gi, gj = gij.T
        gj.clamp_(0, int(gain[3]) - 1)
        gi.clamp_(0, int(gain[2]) - 1)
        indices.append((b, a, gj, gi))
        tbox.append(torch.cat((gxy - gij, gwh), 1))
        anch.append(anchors[a])
        tcls.append(c)
    return tcls, tbox, indices, anch


def compute_loss(p, targets, model):
    ft = torch.cuda.FloatTensor if p[0].is_cuda else torch.Tensor
    lcls, lbox, lobj = ft([0]), ft([0]), ft([0])
    tcls, tbox, indices, anchors = build_targets(p, targets, model)
    h = model.hyp
    red = "mean"
    BCEcls = nn.BCEWithLogitsLoss(pos_weight=ft([h["cls_pw"]]), reduction=red)
    BCEobj = nn.BCEWithLogitsLoss(pos_weight=ft([h["obj_pw"]]), reduction=red)
    cp, cn = 1.0, 0.0
    nt = 0
    for i, pi in enumerate(p):
        b, a, gj, gi = indices[i]
        tobj = torch.zeros_like(pi[..., 0])
        nb = b.shape[0]
        if nb:
            nt += nb
            ps = pi[b, a, gj, gi]
            pxy = ps[:, :2].sigmoid()
            pwh = ps[:, 2:4].exp().clamp(max=1e3) * anchors[i]
            pbox = torch.cat((pxy, pwh), 1)
            giou = bbox_iou(pbox.t(), tbox[i], x1y1x2y2=False, GIoU=True)
            lbox += (1.0 - giou).mean()
            tobj[b, a, gj, gi] = (1.0 - model.gr) + model.gr * giou.detach().clamp(0).type(tobj.dtype)
            if model.nc > 1:
                t = torch.full_like(ps[:, 5:], cn)
                t[range(nb), tcls[i]] = cp
                lcls += BCEcls(ps[:, 5:], t)
        lobj += BCEobj(pi[..., 4], tobj)
    lbox *= h["giou"]
    lobj *= h["obj"]
    lcls *= h["cls"]
    loss = lbox + lobj + lcls
    return loss, torch.cat((lbox, lobj, lcls, loss)).detach()
