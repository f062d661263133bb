"""Gradient statistics of the loss, free from the fused pass: ``compute_loss(..., stats=True)``.

The fused backends compute every gradient term in forward; with ``stats=True`` they also reduce,
per output layer and per loss component, the gradient they write: its L2 norm and its largest
magnitude over the box channels (0-3), the objectness channel (4) and the class channels (5...).
With ``gr`` the objectness target's IoU is detached, so that channel split is exactly the
gradient of each component. Counts of matched pairs, of pairs that share a cell with a later pair,
and of targets no anchor matched complete the picture. Everything stays on the device (no host
sync); ``LossStats.summary()`` and ``problems()`` read the values back.
"""

from __future__ import annotations

import torch

__all__ = ["COMPONENTS", "LossStats"]

#: The loss components, in the column order of ``grad_norm`` / ``grad_max``.
COMPONENTS = ("box", "obj", "cls")


class LossStats:
    """What the loss's gradient looks like, per output layer and component (device tensors).

    Attributes (each computed from the op's statistics when read, on the device, without a sync):
        grad_norm: ``float [nl, 3]``, the L2 norm of d loss / d p[i] over the box channels (0-3),
            the objectness channel (4) and the class channels (5...): each component's gradient.
        grad_max: ``float [nl, 3]``, the largest magnitude of the same entries.
        num_pairs: ``int64 [nl]``, matched (target, anchor[, cell]) pairs per layer.
        num_duplicates: ``int64 [nl]``, pairs that share their cell with a later pair.
        unmatched_targets: ``int64`` scalar, targets that no anchor of any layer matched (they
            contribute nothing to the loss).
        nonfinite: ``bool`` scalar, whether the loss or any gradient entry is NaN or infinite.
    """

    def __init__(self, stats: torch.Tensor, loss: torch.Tensor):
        # the op's stats [nl + 1, 8] (per layer: sums of squares, largest magnitudes, pairs,
        # duplicates; last row: unmatched targets) and the loss; nothing is derived until read,
        # so stats=True costs the kernels' reductions and no more
        self._stats = stats
        self._loss = loss

    @property
    def grad_norm(self) -> torch.Tensor:
        return self._stats[:-1, :3].sqrt()

    @property
    def grad_max(self) -> torch.Tensor:
        return self._stats[:-1, 3:6]

    @property
    def num_pairs(self) -> torch.Tensor:
        return self._stats[:-1, 6].long()

    @property
    def num_duplicates(self) -> torch.Tensor:
        return self._stats[:-1, 7].long()

    @property
    def unmatched_targets(self) -> torch.Tensor:
        return self._stats[-1, 0].long()

    @property
    def nonfinite(self) -> torch.Tensor:
        # a NaN entry makes its sum of squares NaN; an infinite one makes the largest magnitude
        # infinite (a sum of squares that only overflows is not a non-finite entry)
        sq, mx = self._stats[:-1, :3], self._stats[:-1, 3:6]
        return (~torch.isfinite(self._loss)).any() | torch.isnan(sq).any() | (~torch.isfinite(mx)).any()

    def __repr__(self) -> str:
        return f"LossStats(num_layers={self.num_layers}, device={self._stats.device})"

    @property
    def num_layers(self) -> int:
        return self._stats.shape[0] - 1

    def summary(self) -> dict:
        """Plain Python values (reads the device: call it when you log, not inside a captured step)."""
        out = {
            "unmatched_targets": int(self.unmatched_targets),
            "nonfinite": bool(self.nonfinite),
            "num_pairs": self.num_pairs.tolist(),
            "num_duplicates": self.num_duplicates.tolist(),
        }
        for i, (norms, maxima) in enumerate(zip(self.grad_norm.tolist(), self.grad_max.tolist())):
            for name, n, m in zip(COMPONENTS, norms, maxima):
                out[f"grad_norm/{i}/{name}"] = n
                out[f"grad_max/{i}/{name}"] = m
        return out

    def problems(self) -> list[str]:
        """What needs a look, each naming the layer and component: non-finite values, targets no
        anchor matched (reads the device)."""
        out = []
        if bool(self.nonfinite):
            bad = ~torch.isfinite(self.grad_norm) | ~torch.isfinite(self.grad_max)
            where = [f"layer {i} {COMPONENTS[k]}" for i, k in bad.nonzero().tolist()]
            out.append("non-finite loss or gradient" + (f" ({', '.join(where)})" if where else " (the loss itself)"))
        unmatched = int(self.unmatched_targets)
        if unmatched:
            out.append(
                f"{unmatched} target(s) matched no anchor of any layer: they contribute nothing to the loss "
                "(check the anchors against the box sizes, or iou_t / anchor_t)"
            )
        return out
