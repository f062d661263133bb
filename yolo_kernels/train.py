"""Train the package's Darknet on synthetic shapes with the ultralytics recipe the loss expects.

    python -m yolo_kernels.train                                   # yolov3-tiny, 300 steps of 8 at 96px
    python -m yolo_kernels.train --steps 20 --batch 4 --img 64 --backend reference --plot loss.png
    python -m yolo_kernels.train --cfg path/to/model.cfg --amp
    python -m yolo_kernels.train --loss yolov5                     # the YOLOv5-style loss on the same net

The data are generated on the fly (fixed seed, no downloads): coloured rectangles and ellipses on
noise, each a class (kind x colour), with known boxes. The recipe: SGD with momentum 0.937
(Nesterov), weight decay on conv weights only, ``hyp['cls']`` scaled by ``nc / 80``, a burn-in
during which the learning rate warms up and ``model.gr`` ramps from 0 to 1, then cosine decay.
Each step times the loss (its forward and backward, which produces the gradient of ``p``)
separately from the whole step, and records the loss's gradient statistics (``stats=True``: the
gradient norm of each component on each output layer, matched and unmatched targets), warning
once, with the layer and the component, when targets go unmatched or values turn non-finite.
At the end, held-out images are decoded (YOLOLayer's inference output) and each object is
matched to its best-scoring overlapping detection: the mean IoU and the fraction of objects
found with IoU >= 0.5 say whether the model learned to find the shapes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from typing import Any

import torch

from ._cli import check_backends, check_device, check_matplotlib, positive_int, threads_note
from .anchor import yolov3 as loss_api
from .anchor.options import DEFAULT_HYP
from .anchor.yolov3 import compute_loss
from .anchor.yolov5 import DEFAULT_HYP_V5, YOLOv5Loss, default_balance
from .models import SHIPPED, Darknet
from .stats import COMPONENTS

__all__ = ["SyntheticShapes", "build_model", "train", "evaluate", "main"]


class SyntheticShapes:
    """Coloured rectangles and ellipses on noise; class = kind x colour, boxes known exactly."""

    COLOURS = ((0.95, 0.15, 0.15), (0.15, 0.9, 0.2), (0.2, 0.35, 0.95))
    KINDS = ("rectangle", "ellipse")

    def __init__(self, num_classes: int, max_objects: int = 3):
        self.nc = max(1, min(num_classes, len(self.COLOURS) * len(self.KINDS)))
        self.max_objects = max_objects

    def batch(self, n: int, img: int, generator: torch.Generator):
        """``(images [n, 3, img, img] in 0..1, targets [nt, 6] = (image, class, x, y, w, h))``."""
        images = torch.rand(n, 3, img, img, generator=generator) * 0.4 + 0.3
        ys, xs = torch.meshgrid(torch.arange(img) + 0.5, torch.arange(img) + 0.5, indexing="ij")
        rows = []
        for i in range(n):
            for _ in range(int(torch.randint(1, self.max_objects + 1, (1,), generator=generator))):
                cls = int(torch.randint(0, self.nc, (1,), generator=generator))
                w, h = (torch.rand(2, generator=generator) * 0.35 + 0.15).tolist()
                x = float(torch.rand(1, generator=generator)) * (1 - w) + w / 2
                y = float(torch.rand(1, generator=generator)) * (1 - h) + h / 2
                dx, dy = (xs / img - x) / (w / 2), (ys / img - y) / (h / 2)
                kind = self.KINDS[cls // len(self.COLOURS)]
                mask = (dx.abs() <= 1) & (dy.abs() <= 1) if kind == "rectangle" else dx**2 + dy**2 <= 1
                colour = torch.tensor(self.COLOURS[cls % len(self.COLOURS)])[:, None]
                images[i][:, mask] = colour * (0.9 + 0.1 * torch.rand(1, generator=generator))
                rows.append((i, cls, x, y, w, h))
        return images, torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def build_model(cfg: str, nc: int) -> Darknet:
    """A shipped architecture with ``nc`` classes, or the cfg file as it is."""
    model = Darknet(SHIPPED[cfg](nc)) if cfg in SHIPPED else Darknet(cfg)
    model.hyp = dict(DEFAULT_HYP)
    model.hyp["cls"] *= model.nc / 80  # as ultralytics' train.py does
    model.gr = 0.0
    return model


def _param_groups(model: Darknet, weight_decay: float):
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            conv_weight = isinstance(module, torch.nn.Conv2d) and name == "weight"
            (decay if conv_weight else no_decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def train(
    model: Darknet,
    steps: int,
    batch: int,
    img: int,
    backend: str = "auto",
    amp: bool = False,
    lr0: float = 0.01,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    stats: bool = True,
    loss: str = "yolov3",
) -> dict[str, Any]:
    """Train in place; returns per-step ``items`` (lbox, lobj, lcls, loss), ``loss_ms`` and
    ``step_ms``, and with ``stats`` ``grad_norm`` (``[nl][3]``: box, obj, cls per output layer),
    ``unmatched_share`` (the share of targets no anchor matched) and ``nonfinite``.

    ``loss="yolov5"`` trains with the YOLOv5-style loss (``YOLOv5Loss`` on the network's anchors,
    with yolov5's ``train.py`` scaling of the gains and its balance by stride, ``gr`` 1); ``items``
    are then ``(lbox, lobj, lcls, their sum)`` and the loss is that sum times the batch size."""
    if loss not in ("yolov3", "yolov5"):
        raise ValueError(f"loss: expected 'yolov3' or 'yolov5', got {loss!r}")
    torch.manual_seed(seed)
    model.to(device).train()
    criterion = _yolov5_criterion(model, img, backend) if loss == "yolov5" else None
    data = SyntheticShapes(model.nc)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(_param_groups(model, 5e-4), lr=lr0, momentum=0.937, nesterov=True)
    amp_dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.startswith("cuda"))
    burn_in = max(1, min(steps // 5, 200))
    history: dict[str, list] = {"items": [], "loss_ms": [], "step_ms": []}
    if stats:
        history.update(grad_norm=[], unmatched_share=[], nonfinite=[])
    warned: set[str] = set()
    for step in range(steps):
        if step < burn_in:
            ramp = (step + 1) / burn_in
            model.gr, lr = ramp, lr0 * ramp
        else:
            model.gr = 1.0
            lr = lr0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - burn_in) / max(1, steps - burn_in))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = data.batch(batch, img, gen)
        images, targets = images.to(device), targets.to(device)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype, enabled=amp):
            p = model(images)
        # The loss on detached heads, so that its own forward + backward can be timed; then the
        # head gradients flow into the network: the same computation as loss.backward().
        heads = [x.detach().requires_grad_() for x in p]
        _sync(device)
        loss_start = time.perf_counter()
        if criterion is None:
            loss_value, items, *loss_stats = compute_loss(heads, targets, model, backend=backend, stats=stats)
        else:
            loss_value, items, *loss_stats = criterion(heads, targets, stats=stats)
            items = torch.cat((items, items.sum().reshape(1)))
        scaler.scale(loss_value).backward()
        _sync(device)
        loss_ms = (time.perf_counter() - loss_start) * 1e3
        torch.autograd.backward(p, [h.grad for h in heads])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        step_ms = (time.perf_counter() - start) * 1e3
        history["items"].append(items.tolist())
        history["loss_ms"].append(loss_ms)
        history["step_ms"].append(step_ms)
        if stats:
            _record_stats(history, loss_stats[0], targets.shape[0], step, warned)
        if progress:
            _progress(step, steps, items.tolist(), step_ms)
    return history


def _yolov5_criterion(model: Darknet, img: int, backend: str) -> YOLOv5Loss:
    """``YOLOv5Loss`` on the network's heads, as yolov5's ``train.py`` sets it up: gains scaled by
    the number of layers, classes and image size; the P3-first balance given to the layers by
    stride (the Darknet heads come coarse first)."""
    heads = [model.module_list[j] for j in model.yolo_layers]
    strides = [float(h.stride) for h in heads]
    nl = len(heads)
    hyp = dict(DEFAULT_HYP_V5)
    hyp["box"] *= 3 / nl
    hyp["cls"] *= model.nc / 80 * 3 / nl
    hyp["obj"] *= (img / 640) ** 2 * 3 / nl
    by_stride = sorted(range(nl), key=lambda i: strides[i])
    balance = [0.0] * nl
    for weight, i in zip(default_balance(nl), by_stride):
        balance[i] = weight
    anchors = [h.anchor_vec.detach().cpu() * s for h, s in zip(heads, strides)]
    device = heads[0].anchor_vec.device
    return YOLOv5Loss(anchors, strides, model.nc, hyp=hyp, balance=balance, backend=backend).to(device)


def _record_stats(history: dict[str, list], loss_stats, n_targets: int, step: int, warned: set[str]) -> None:
    """Append one step's gradient statistics; warn once per kind of problem (unmatched targets,
    non-finite values), naming the step, the layer and the component."""
    history["grad_norm"].append(loss_stats.grad_norm.tolist())
    unmatched = int(loss_stats.unmatched_targets)
    history["unmatched_share"].append(unmatched / n_targets if n_targets else 0.0)
    history["nonfinite"].append(bool(loss_stats.nonfinite))
    for message in loss_stats.problems():
        kind = "non-finite" if message.startswith("non-finite") else "unmatched"
        if kind not in warned:
            warned.add(kind)
            warnings.warn(f"yolo_kernels.train: step {step}: {message}", RuntimeWarning, stacklevel=3)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _progress(step: int, steps: int, items: list[float], step_ms: float) -> None:
    if not sys.stderr.isatty():
        return
    done = int(25 * (step + 1) / steps)
    lbox, lobj, lcls, total = items
    print(
        f"\r[{'#' * done}{'.' * (25 - done)}] {step + 1}/{steps} box {lbox:.3f} obj {lobj:.3f} cls {lcls:.3f} "
        f"loss {total:.3f} {1e3 / step_ms:.2f} steps/s",
        end="\n" if step + 1 == steps else "",
        file=sys.stderr,
    )


def _corners(xywh: torch.Tensor) -> torch.Tensor:
    return torch.cat((xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2), -1)


@torch.no_grad()
def evaluate(model: Darknet, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Each object's best-scoring overlapping detection (score = objectness x class probability):
    ``mean_iou`` over objects and ``found_at_0.5``, the fraction with IoU >= 0.5."""
    model.eval()
    decoded, _ = model(images)
    model.train()
    img_h, img_w = images.shape[-2:]
    ious = []
    for b, cls, x, y, w, h in targets.tolist():
        det = decoded[int(b)].float()
        gt = _corners(torch.tensor([x * img_w, y * img_h, w * img_w, h * img_h]))
        boxes = _corners(det[:, :4])
        lt, rb = torch.maximum(boxes[:, :2], gt[:2]), torch.minimum(boxes[:, 2:], gt[2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        union = (boxes[:, 2:] - boxes[:, :2]).prod(1) + (gt[2:] - gt[:2]).prod() - inter
        iou = inter / union
        score = det[:, 4] * (det[:, 5 + int(cls)] if det.shape[1] > 5 else 1.0)
        score = torch.where(iou > 0, score, torch.full_like(score, -1.0))
        ious.append(float(iou[score.argmax()]) if bool((iou > 0).any()) else 0.0)
    ious_t = torch.tensor(ious)
    return {
        "mean_iou": float(ious_t.mean()),
        "found_at_0.5": float((ious_t >= 0.5).float().mean()),
        "objects": len(ious),
    }


def plot_history(history: dict[str, list], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or yolo_kernels[plot])") from None
    items = torch.tensor(history["items"])
    with_stats = bool(history.get("grad_norm"))
    fig, axes = plt.subplots(1, 3 if with_stats else 1, figsize=(19 if with_stats else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for k, name in enumerate(("lbox", "lobj", "lcls", "loss")):
        ax.plot(items[:, k].numpy(), label=name, linewidth=2 if name == "loss" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("YOLOv3 loss on synthetic shapes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if with_stats:
        norms = torch.tensor(history["grad_norm"])  # [steps, nl, 3]
        ax = axes[0][1]
        styles = ("-", "--", ":")
        for i in range(norms.shape[1]):
            for k, name in enumerate(COMPONENTS):
                ax.plot(norms[:, i, k].numpy(), styles[k], color=f"C{i}", label=f"layer {i} {name}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("||d loss / d p||")
        ax.set_title("gradient norm per output layer and component")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax = axes[0][2]
        ax.plot(torch.tensor(history["unmatched_share"]).numpy() * 100)
        ax.set_xlabel("step")
        ax.set_ylabel("% of targets")
        ax.set_title("targets no anchor matched")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yolo_kernels.train", description=__doc__.split("\n\n")[0])
    max_nc = len(SyntheticShapes.COLOURS) * len(SyntheticShapes.KINDS)
    parser.add_argument("--cfg", default="yolov3-tiny", help="shipped name or cfg path (default yolov3-tiny)")
    parser.add_argument(
        "--nc",
        type=positive_int,
        default=max_nc,
        help=f"classes for a shipped architecture (1..{max_nc}; default {max_nc})",
    )
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch", type=positive_int, default=8, help="images per step (default 8)")
    parser.add_argument("--img", type=positive_int, default=96, help="image size, a multiple of 32 (default 96)")
    parser.add_argument(
        "--backend", default="auto", help=f"'auto' or one of {sorted(loss_api.BACKENDS)} (default auto)"
    )
    parser.add_argument("--loss", choices=["yolov3", "yolov5"], default="yolov3", help="loss family (default yolov3)")
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 + GradScaler on CUDA)")
    parser.add_argument("--lr", type=float, default=0.01, help="initial learning rate (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"cpu or cuda (default {default_device})")
    parser.add_argument(
        "--eval-images", type=positive_int, default=32, help="held-out images for the detection check (default 32)"
    )
    parser.add_argument(
        "--threads", type=positive_int, help="CPU threads (torch.set_num_threads; default: torch's, OMP_NUM_THREADS)"
    )
    parser.add_argument("--plot", metavar="FILE.png", help="loss curves and gradient statistics (needs matplotlib)")
    parser.add_argument("--no-stats", action="store_true", help="skip the gradient statistics (stats=True of the loss)")
    args = parser.parse_args(argv)
    if args.img % 32:
        parser.error(f"--img: expected a multiple of 32, got {args.img}")
    if args.cfg in SHIPPED and args.nc > max_nc:
        parser.error(f"--nc: the synthetic data has {max_nc} classes; expected 1..{max_nc}, got {args.nc}")
    device = check_device(parser, args.device)
    check_backends(parser, [args.backend], device, "--backend")
    if args.plot:
        check_matplotlib(parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the initial weights too: same seed, same run
    model = build_model(args.cfg, args.nc)
    backend = loss_api.resolve_backend(args.backend, device, warn=False).name  # what auto picks here
    print(
        f"{args.cfg} (nc={model.nc}) on synthetic shapes, {args.steps} steps, batch {args.batch}, {args.img}px, "
        f"{args.loss} loss, backend {backend}"
        + (" (auto)" if args.backend == "auto" else "")
        + f", amp {args.amp}, device {args.device}"
    )
    if device.type == "cpu":
        print(threads_note(torch.get_num_threads()))
    sys.stdout.flush()  # the header before the progress bar
    history = train(
        model,
        args.steps,
        args.batch,
        args.img,
        args.backend,
        args.amp,
        args.lr,
        args.seed,
        args.device,
        progress=True,
        stats=not args.no_stats,
        loss=args.loss,
    )
    quality = None
    if args.loss == "yolov3":  # the network decodes its boxes the YOLOv3 way
        gen = torch.Generator().manual_seed(args.seed + 1)
        held_out = SyntheticShapes(model.nc).batch(args.eval_images, args.img, gen)
        quality = evaluate(model, held_out[0].to(args.device), held_out[1])
    steady = slice(min(5, args.steps - 1), None)  # skip warm-up steps in the timings
    loss_ms = torch.tensor(history["loss_ms"][steady]).median().item()
    step_ms = torch.tensor(history["step_ms"][steady]).median().item()
    first, last = history["items"][0][3], history["items"][-1][3]
    print(
        f"loss {first:.3f} -> {last:.3f}; loss fwd+bwd {loss_ms:.2f} ms of a {step_ms:.1f} ms step "
        f"({100 * loss_ms / step_ms:.1f}%), medians"
    )
    if quality is not None:
        print(
            f"held-out detection: mean IoU {quality['mean_iou']:.3f}, found at IoU>=0.5 "
            f"{quality['found_at_0.5']:.1%} of {quality['objects']} objects"
        )
    else:
        print(
            "held-out detection: not evaluated (the network decodes boxes as YOLOv3 does; the yolov5 "
            "loss trains the YOLOv5 box parametrisation)"
        )
    if history.get("grad_norm"):
        last_norms = history["grad_norm"][-1]
        parts = [
            f"layer {i} " + " ".join(f"{name} {v:.3g}" for name, v in zip(COMPONENTS, norms))
            for i, norms in enumerate(last_norms)
        ]
        unmatched = sum(history["unmatched_share"]) / len(history["unmatched_share"])
        print(f"gradient norms at the last step: {'; '.join(parts)}; unmatched targets {unmatched:.1%} on average")
    if args.plot:
        plot_history(history, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
