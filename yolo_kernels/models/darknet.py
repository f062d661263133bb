"""The Darknet network of ultralytics/yolov3 (archive branch), built from module definitions.

``Darknet(cfg)`` takes a cfg path, the name of a shipped architecture (``yolov3``,
``yolov3-spp``, ``yolov3-tiny`` generated in code for any ``nc``; ``yolov3-1cls`` and ``yolov4``
from the cfg files packaged in ``models/cfg/``) or parsed module definitions. It exposes what the loss reads:
``yolo_layers``, ``module_list[j].anchor_vec``, and the attributes a training loop sets,
``hyp`` (``yolo_kernels.DEFAULT_HYP``), ``gr`` (1.0) and ``nc`` (from the cfg).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..anchor.options import DEFAULT_HYP
from .cfg import parse_model_cfg
from .zoo import SHIPPED, packaged_cfg_names, packaged_cfg_path

__all__ = ["Darknet", "YOLOLayer", "WeightedFeatureFusion", "FeatureConcat", "Swish", "Mish", "create_modules"]


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.softplus(x).tanh()


_ACTIVATIONS = {
    "leaky": lambda: nn.LeakyReLU(0.1, inplace=True),
    "relu": lambda: nn.ReLU(inplace=True),
    "swish": Swish,
    "mish": Mish,
    "logistic": nn.Sigmoid,
    "linear": None,
}


class WeightedFeatureFusion(nn.Module):
    """``[shortcut]``: the sum of the previous output and the outputs of ``layers``, optionally
    weighted by learned sigmoid weights; channel counts that differ are added on the overlap."""

    def __init__(self, layers: Sequence[int], weight: bool = False):
        super().__init__()
        self.layers = list(layers)
        self.weight = weight
        self.n = len(layers) + 1
        if weight:
            self.w = nn.Parameter(torch.zeros(self.n))

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        if self.weight:
            w = torch.sigmoid(self.w) * (2 / self.n)
            x = x * w[0]
        nx = x.shape[1]
        for i, layer in enumerate(self.layers):
            a = outputs[layer] * w[i + 1] if self.weight else outputs[layer]
            na = a.shape[1]
            if nx == na:
                x = x + a
            elif nx > na:  # add into the first channels of x
                x = torch.cat((x[:, :na] + a, x[:, na:]), 1)
            else:  # add the first channels of a
                x = x + a[:, :nx]
        return x


class FeatureConcat(nn.Module):
    """``[route]``: the outputs of ``layers`` concatenated along channels (or the one output)."""

    def __init__(self, layers: Sequence[int]):
        super().__init__()
        self.layers = list(layers)
        self.multiple = len(layers) > 1

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        if self.multiple:
            return torch.cat([outputs[i] for i in self.layers], 1)
        return outputs[self.layers[0]]


class YOLOLayer(nn.Module):
    """A detection head: reshapes ``[bs, na*(nc+5), ny, nx]`` to ``[bs, na, ny, nx, nc+5]``.

    Training mode returns that tensor (the loss's ``p[i]``); eval mode returns
    ``(decoded [bs, na*ny*nx, nc+5], p)`` with boxes in pixels: ``(sigmoid(xy) + grid) * stride``,
    ``exp(wh) * anchor``, and sigmoid objectness and class scores.
    """

    def __init__(self, anchors: Any, nc: int, stride: int, yolo_index: int = 0):
        super().__init__()
        anchors = torch.as_tensor(np.asarray(anchors, dtype=np.float32)).reshape(-1, 2)
        self.index = yolo_index
        self.stride = stride
        self.na = anchors.shape[0]
        self.nc = nc
        self.no = nc + 5
        # Buffers, so model.to(device) moves them; anchor_vec is in grid units (what the loss reads).
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("anchor_vec", anchors / stride, persistent=False)

    @property
    def anchor_wh(self) -> torch.Tensor:
        return self.anchor_vec.view(1, self.na, 1, 1, 2)

    def forward(self, p: torch.Tensor, out: list | None = None):
        bs, channels, ny, nx = p.shape
        if channels != self.na * self.no:
            raise ValueError(
                f"YOLOLayer {self.index}: expected {self.na} * {self.no} = {self.na * self.no} input channels, "
                f"got {channels}"
            )
        p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
        if self.training:
            return p
        return self.decode(p).view(bs, -1, self.no), p

    def decode(self, p: torch.Tensor) -> torch.Tensor:
        """Boxes and scores from ``p [bs, na, ny, nx, no]``: centre-xywh in pixels, then sigmoid scores."""
        _, _, ny, nx, _ = p.shape
        yv, xv = torch.meshgrid(torch.arange(ny, device=p.device), torch.arange(nx, device=p.device), indexing="ij")
        grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).to(p.dtype)
        xy = (torch.sigmoid(p[..., :2]) + grid) * self.stride
        wh = torch.exp(p[..., 2:4]) * self.anchor_wh.to(p.dtype) * self.stride
        return torch.cat((xy, wh, torch.sigmoid(p[..., 4:])), -1)

    def extra_repr(self) -> str:
        return f"na={self.na}, nc={self.nc}, stride={self.stride}"


def _layer_index(i: int, layer: int) -> int:
    return i + layer if layer < 0 else layer


def create_modules(module_defs: list[dict[str, Any]], in_channels: int = 3):
    """Build ``(module_list, routs, strides)`` from module definitions without the ``[net]`` block.

    ``routs[i]`` says whether layer ``i``'s output is read by a later layer; ``strides[i]`` is the
    total downsampling of layer ``i``'s output (the stride of a YOLO layer is its input's).
    """
    module_list = nn.ModuleList()
    routs: list[int] = []
    channels = [in_channels]  # channels[i + 1] is layer i's output; channels[0] the image
    strides = [1.0]
    yolo_index = -1

    for i, mdef in enumerate(module_defs):
        kind = mdef["type"]
        where = f"layer {i} [{kind}]"
        c_in, s_in = channels[-1], strides[-1]
        if kind == "convolutional":
            k = mdef["size"]
            if not isinstance(k, int):
                raise ValueError(f"{where}: multi-size kernels (size={k}) are not supported")
            stride = mdef["stride"] if "stride" in mdef else (mdef["stride_y"], mdef["stride_x"])
            bn = bool(mdef.get("batch_normalize", 0))
            c_out = mdef["filters"]
            module = nn.Sequential()
            module.add_module(
                "Conv2d",
                nn.Conv2d(
                    c_in,
                    c_out,
                    k,
                    stride=stride,
                    padding=k // 2 if mdef.get("pad", 0) else 0,
                    groups=mdef.get("groups", 1),
                    bias=not bn,
                ),
            )
            if bn:
                module.add_module("BatchNorm2d", nn.BatchNorm2d(c_out, momentum=0.03, eps=1e-4))
            else:
                routs.append(i)  # a detection output
            activation = mdef.get("activation", "linear")
            if activation not in _ACTIVATIONS:
                raise ValueError(f"{where}: unsupported activation {activation!r}; supported: {sorted(_ACTIVATIONS)}")
            if _ACTIVATIONS[activation] is not None:
                module.add_module("activation", _ACTIVATIONS[activation]())
            s_out = s_in * (stride if isinstance(stride, int) else max(stride))
        elif kind == "maxpool":
            k = mdef["size"]
            stride = mdef.get("stride", 1)
            pool = nn.MaxPool2d(kernel_size=k, stride=stride, padding=(k - 1) // 2)
            if k == 2 and stride == 1:  # tiny-YOLO: pad right/bottom so the size is kept
                module = nn.Sequential()
                module.add_module("ZeroPad2d", nn.ZeroPad2d((0, 1, 0, 1)))
                module.add_module("MaxPool2d", pool)
            else:
                module = pool
            c_out, s_out = c_in, s_in * stride
        elif kind == "upsample":
            module = nn.Upsample(scale_factor=mdef["stride"])
            c_out, s_out = c_in, s_in / mdef["stride"]
        elif kind == "route":
            layers = mdef["layers"]
            sources = [_layer_index(i, layer) for layer in layers]
            if any(not 0 <= j < i for j in sources):
                raise ValueError(f"{where}: layers={layers} must refer to earlier layers")
            c_out = sum(channels[j + 1] for j in sources)
            s_out = strides[sources[0] + 1]
            routs.extend(sources)
            module = FeatureConcat(layers=layers)
        elif kind == "shortcut":
            layers = mdef["from"]
            sources = [_layer_index(i, layer) for layer in layers]
            if any(not 0 <= j < i for j in sources):
                raise ValueError(f"{where}: from={layers} must refer to earlier layers")
            c_out, s_out = c_in, s_in
            routs.extend(sources)
            module = WeightedFeatureFusion(layers=layers, weight="weights_type" in mdef)
        elif kind == "dropout":
            module = nn.Dropout(p=float(mdef["probability"]))
            c_out, s_out = c_in, s_in
        elif kind == "yolo":
            yolo_index += 1
            if "from" in mdef:
                raise ValueError(f"{where}: 'from' (ASFF heads) is not supported")
            if not float(s_in).is_integer():
                raise ValueError(f"{where}: input stride {s_in} is not an integer")
            mask = mdef.get("mask", list(range(len(mdef["anchors"]))))
            module = YOLOLayer(mdef["anchors"][mask], nc=mdef["classes"], stride=int(s_in), yolo_index=yolo_index)
            _init_head_bias(module_list, module, where)
            c_out, s_out = c_in, s_in
        else:
            raise ValueError(f"{where}: unsupported layer type {kind!r}")
        module_list.append(module)
        channels.append(c_out)
        strides.append(s_out)

    routs_binary = [False] * len(module_defs)
    for j in routs:
        routs_binary[j] = True
    return module_list, routs_binary, strides[1:]


def _init_head_bias(module_list: nn.ModuleList, yolo: YOLOLayer, where: str) -> None:
    """Objectness bias -4.5 and class bias log(0.6 / (nc - 0.99)) on the conv feeding ``yolo``
    (focal-loss paper §3.3: a low prior at start), in place on the existing parameter."""
    j = len(module_list) - 1
    if isinstance(module_list[j], nn.Dropout):
        j -= 1
    conv = module_list[j][0] if isinstance(module_list[j], nn.Sequential) and len(module_list[j]) else None
    if not isinstance(conv, nn.Conv2d) or conv.bias is None or conv.out_channels < yolo.na * yolo.no:
        raise ValueError(f"{where}: expected a biased conv with >= {yolo.na * yolo.no} outputs before the YOLO layer")
    with torch.no_grad():
        bias = conv.bias[: yolo.na * yolo.no].view(yolo.na, yolo.no)
        bias[:, 4] += -4.5
        bias[:, 5:] += math.log(0.6 / (yolo.nc - 0.99))


def _load_defs(cfg: Any) -> tuple[list[dict[str, Any]], str]:
    if isinstance(cfg, (list, tuple)):
        return copy.deepcopy(list(cfg)), "<module_defs>"
    if not isinstance(cfg, (str, os.PathLike)):
        raise TypeError(f"cfg: expected a cfg path, a shipped name or module definitions, got {type(cfg).__name__}")
    name = os.fspath(cfg)
    if os.path.exists(name) or os.path.exists(name + ".cfg"):  # a file of the user's wins over a shipped name
        return parse_model_cfg(name), name
    shipped = name[: -len(".cfg")] if name.endswith(".cfg") else name
    if shipped in SHIPPED:
        return SHIPPED[shipped](80), shipped
    if shipped in packaged_cfg_names():
        return parse_model_cfg(packaged_cfg_path(shipped)), shipped
    names = sorted(set(SHIPPED) | set(packaged_cfg_names()))
    raise FileNotFoundError(f"cfg: no file {name!r} and not a shipped architecture {names}")


class Darknet(nn.Module):
    """YOLOv3-family detector from a Darknet cfg.

    Args:
        cfg: path to a ``.cfg`` file, a shipped name (``yolov3``, ``yolov3-spp``, ``yolov3-tiny``,
            ``yolov3-1cls``, ``yolov4``; 80 classes but the 1-class one) or module definitions as
            ``parse_model_cfg`` returns them (``[net]`` first).
        img_size: kept for the original's signature; the network itself is size-agnostic
            (any multiple of the largest stride).

    Training mode returns the list of YOLO outputs ``[bs, na, ny, nx, nc + 5]`` (the loss's ``p``);
    eval mode returns ``(decoded [bs, N, nc + 5], p)``.
    """

    def __init__(self, cfg: Any, img_size: int | tuple[int, int] = (416, 416), verbose: bool = False):
        super().__init__()
        defs, self.cfg_name = _load_defs(cfg)
        if not defs or defs[0].get("type") != "net":
            raise ValueError(f"cfg: expected the first block to be [net], got {defs[0].get('type') if defs else None}")
        self.module_defs = defs[1:]
        channels = int(defs[0].get("channels", 3))
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.module_list, self.routs, _ = create_modules(self.module_defs, channels)
        self.yolo_layers = [i for i, m in enumerate(self.module_list) if isinstance(m, YOLOLayer)]
        if not self.yolo_layers:
            raise ValueError(f"cfg: {self.cfg_name} has no [yolo] layer")
        heads = [self.module_list[j] for j in self.yolo_layers]
        if len({h.nc for h in heads}) != 1:
            raise ValueError(f"cfg: YOLO layers disagree on classes: {[h.nc for h in heads]}")
        self.nc = heads[0].nc
        self.stride = [h.stride for h in heads]
        self.hyp = dict(DEFAULT_HYP)
        self.gr = 1.0
        if verbose:
            print(self.info())

    def forward(self, x: torch.Tensor):
        yolo_out, out = [], []
        for i, module in enumerate(self.module_list):
            if isinstance(module, (WeightedFeatureFusion, FeatureConcat)):
                x = module(x, out)
            elif isinstance(module, YOLOLayer):
                yolo_out.append(module(x, out))
            else:
                x = module(x)
            out.append(x if self.routs[i] else [])
        if self.training:
            return yolo_out
        decoded, p = zip(*yolo_out)
        return torch.cat(decoded, 1), p

    def info(self) -> str:
        n_params = sum(p.numel() for p in self.parameters())
        return (
            f"Darknet({self.cfg_name}): {len(self.module_list)} layers, {n_params:,} parameters, "
            f"nc={self.nc}, yolo_layers={self.yolo_layers}, strides={self.stride}"
        )
