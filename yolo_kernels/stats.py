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

import dataclasses

import torch

__all__ = ["COMPONENTS", "LossStats"]

#: The loss components, in the column order of ``grad_norm`` / ``grad_max``.
COMPONENTS = ("box", "obj", "cls")


@dataclasses.dataclass(frozen=True)
class LossStats:
    """What the loss's gradient looks like, per output layer and component (device tensors).

    Attributes:
        grad_norm: ``float [nl, 3]``, the L2 norm of d loss / d p[i] over the box channels (0-3),
            the objectness channel (4) and the class channels (5...): each component's gradient.
        grad_max: ``float [nl, 3]``, the largest magnitude of the same entries.
        num_pairs: ``int64 [nl]``, matched (target, anchor[, cell]) pairs per layer.
        num_duplicates: ``int64 [nl]``, pairs that share their cell with a later pair.
        unmatched_targets: ``int64`` scalar, targets that no anchor of any layer matched (they
            contribute nothing to the loss).
        nonfinite: ``bool`` scalar, whether the loss or any gradient entry is NaN or infinite.
    """

    grad_norm: torch.Tensor
    grad_max: torch.Tensor
    num_pairs: torch.Tensor
    num_duplicates: torch.Tensor
    unmatched_targets: torch.Tensor
    nonfinite: torch.Tensor

    @classmethod
    def from_op(cls, stats: torch.Tensor, loss: torch.Tensor, unmatched: torch.Tensor) -> LossStats:
        """From the op's ``stats [nl, 8]`` (sums of squares, largest magnitudes, pairs, duplicates),
        the loss and the count of unmatched targets. Device ops only: no host sync."""
        sq, mx = stats[:, :3], stats[:, 3:6]
        # a NaN entry makes its sum of squares NaN; an infinite one makes the largest magnitude
        # infinite (a sum of squares that only overflows is not a non-finite entry)
        nonfinite = (~torch.isfinite(loss)).any() | torch.isnan(sq).any() | (~torch.isfinite(mx)).any()
        return cls(sq.sqrt(), mx, stats[:, 6].long(), stats[:, 7].long(), unmatched.long(), nonfinite)

    @property
    def num_layers(self) -> int:
        return self.grad_norm.shape[0]

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
