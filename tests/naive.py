"""An independent scalar implementation of docs/semantics.md in plain Python floats, for small inputs.

It shares no code with ``yolo_kernels``: loops over pairs and cells, written from the spec text.
"""

from __future__ import annotations

import math


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def bce(x, y, pos_weight=1.0, gamma=0.0, alpha=0.25):
    loss = -(pos_weight * y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x))
    if gamma > 0:
        s = _sigmoid(x)
        p_t = y * s + (1 - y) * (1 - s)
        loss *= (y * alpha + (1 - y) * (1 - alpha)) * (1 - p_t) ** gamma
    return loss


def box_iou(b1, b2, kind):
    """IoU-family of two centre-xywh boxes (b1 predicted, b2 target), with the spec's constants."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = b1, b2
    l1, r1, t1, d1 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    l2, r2, t2, d2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = max(min(r1, r2) - max(l1, l2), 0) * max(min(d1, d2) - max(t1, t2), 0)
    union = (r1 - l1) * (d1 - t1) + 1e-16 + (r2 - l2) * (d2 - t2) - inter
    iou = inter / union
    if kind == "iou":
        return iou
    cw, ch = max(r1, r2) - min(l1, l2), max(d1, d2) - min(t1, t2)
    if kind == "giou":
        c_area = cw * ch + 1e-16
        return iou - (c_area - union) / c_area
    c2 = cw**2 + ch**2 + 1e-16
    rho2 = ((l2 + r2) - (l1 + r1)) ** 2 / 4 + ((t2 + d2) - (t1 + d1)) ** 2 / 4
    if kind == "diou":
        return iou - rho2 / c2
    v = 4 / math.pi**2 * (math.atan((r2 - l2) / (d2 - t2)) - math.atan((r1 - l1) / ((d1 - t1) + 1e-16))) ** 2
    return iou - (rho2 / c2 + v * v / (1 - iou + v))


def match(targets, anchors, ny, nx, iou_t):
    """Pairs (b, a, gj, gi, tbox, anchor, cls) in anchor-major order."""
    pairs = []
    for a, (aw, ah) in enumerate(anchors):
        for b, c, x, y, w, h in targets:
            gx, gy, gw, gh = x * nx, y * ny, w * nx, h * ny
            inter = min(aw, gw) * min(ah, gh)
            if inter / (aw * ah + gw * gh - inter) > iou_t:
                gi = min(max(int(gx), 0), nx - 1)  # int() truncates toward zero
                gj = min(max(int(gy), 0), ny - 1)
                pairs.append((int(b), a, gj, gi, (gx - gi, gy - gj, gw, gh), (aw, ah), int(c)))
    return pairs


def loss(
    p,
    targets,
    anchors,
    *,
    nc,
    gr=1.0,
    giou=3.54,
    cls=37.4,
    cls_pw=1.0,
    obj=64.3,
    obj_pw=1.0,
    iou_t=0.2,
    fl_gamma=0.0,
    box_loss="giou",
    reduction="mean",
    label_smoothing=0.0,
):
    """``p``: per layer nested lists [bs][na][ny][nx][nc+5]; returns (lbox, lobj, lcls, loss)."""
    cp, cn = 1 - label_smoothing / 2, label_smoothing / 2
    lbox = lobj = lcls = 0.0
    n_total = 0
    bs = len(p[0])
    for pi, anc in zip(p, anchors):
        na, ny, nx = len(pi[0]), len(pi[0][0]), len(pi[0][0][0])
        pairs = match(targets, anc, ny, nx, iou_t)
        tobj = {}
        box_terms, cls_terms = [], []
        for b, a, gj, gi, tbox, (aw, ah), c in pairs:
            row = pi[b][a][gj][gi]
            pbox = (
                _sigmoid(row[0]),
                _sigmoid(row[1]),
                min(math.exp(row[2]), 1e3) * aw,
                min(math.exp(row[3]), 1e3) * ah,
            )
            iou = box_iou(pbox, tbox, box_loss)
            box_terms.append(1 - iou)
            tobj[(b, a, gj, gi)] = (1 - gr) + gr * max(iou, 0.0)  # later pairs overwrite: last wins
            if nc > 1:
                cls_terms += [bce(row[5 + k], cp if k == c else cn, cls_pw, fl_gamma) for k in range(nc)]
        obj_terms = [
            bce(pi[b][a][j][i][4], tobj.get((b, a, j, i), 0.0), obj_pw, fl_gamma)
            for b in range(bs)
            for a in range(na)
            for j in range(ny)
            for i in range(nx)
        ]
        n_total += len(pairs)
        if reduction == "mean":
            lbox += sum(box_terms) / len(box_terms) if box_terms else 0.0
            lcls += sum(cls_terms) / len(cls_terms) if cls_terms else 0.0
            lobj += sum(obj_terms) / len(obj_terms)
        else:
            lbox, lcls, lobj = lbox + sum(box_terms), lcls + sum(cls_terms), lobj + sum(obj_terms)
    lbox, lobj, lcls = lbox * giou, lobj * obj, lcls * cls
    if reduction == "sum":
        lobj *= 3.0 / bs
        if n_total:
            lcls *= 3.0 / n_total / nc
            lbox *= 3.0 / n_total
    return lbox, lobj, lcls, lbox + lobj + lcls
