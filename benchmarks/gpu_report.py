"""One command for a GPU machine: correctness, speed, memory, sync-freedom and CUDA-graph capture of
the Triton loss, written to ``benchmarks/results/gpu-<card>.json`` and ``.md``.

    python benchmarks/gpu_report.py                 # batches 16 64, images 416 640
    python benchmarks/gpu_report.py --batch 16 --img 416 --quick

Sections:
* parity: triton vs the reference on CUDA, float32 and bfloat16 ``p`` (max relative error of the
  loss items and of the gradients; bf16 against the reference on the same values upcast);
* speed: forward + backward medians (``triton.testing.do_bench``, which synchronises) of the
  reference, ``torch.compile(reference)`` and triton, YOLOv3 shapes, 10 targets per image;
* the DRAM floor: bytes that must move (the gradient written once, the objectness logit of every
  cell read once) over the device-to-device copy bandwidth measured in the same run, and each
  provider's ratio to it;
* peak memory beyond the inputs, from the caching allocator;
* no host sync: forward + backward under ``torch.cuda.set_sync_debug_mode("error")``;
* CUDA graphs: forward + backward captured once and replayed, results identical to eager; and a
  whole training step (network, loss, backward, optimizer) captured and replayed like eager steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys

import torch

import yolo_kernels as yk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from conftest import yolov3_inputs  # noqa: E402


def floor_bytes(p) -> int:
    """Bytes a fused loss must move: write the gradient once, read every cell's objectness once."""
    grad = sum(x.numel() * x.element_size() for x in p)
    objectness = sum(x[..., 4].numel() * x.element_size() for x in p)
    return grad + objectness


def copy_bandwidth(device, nbytes=1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    import triton.testing

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def cuda_inputs(batch, img, dtype=torch.float32):
    model, p, targets = yolov3_inputs(batch, img)
    model = model.cuda()
    return model, [x.detach().cuda().to(dtype).requires_grad_() for x in p], targets.cuda()


def forward_backward(p, targets, model, backend=None, loss_fn=None):
    for x in p:
        x.grad = None
    loss, items = loss_fn(p, targets, model) if loss_fn else yk.compute_loss(p, targets, model, backend=backend)
    loss.backward()
    return loss, items


def parity(batch, img):
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model, p, targets = cuda_inputs(batch, img, dtype)
        _, items = forward_backward(p, targets, model, "triton")
        grads = [x.grad.clone() for x in p]
        up = [x.detach().float().requires_grad_() for x in p]
        _, ref_items = forward_backward(up, targets, model, "reference")
        err_grad = max(rel_err(g.float(), r.grad) for g, r in zip(grads, up))
        rows.append({"dtype": str(dtype).replace("torch.", ""), "batch": batch, "img": img,
                     "loss_rel_err": rel_err(items, ref_items), "grad_rel_err": err_grad})  # fmt: skip
    return rows


def speed(batch, img, bandwidth, quick=False):
    import triton.testing

    model, p, targets = cuda_inputs(batch, img)
    floor_ms = floor_bytes(p) / bandwidth * 1e3
    compiled = torch.compile(yk.reference.compute_loss)
    providers = {
        "reference": lambda: forward_backward(p, targets, model, "reference"),
        "torch.compile(reference)": lambda: forward_backward(p, targets, model, loss_fn=compiled),
        "triton": lambda: forward_backward(p, targets, model, "triton"),
    }
    if quick:
        providers.pop("torch.compile(reference)")
    rows = []
    base = torch.cuda.memory_allocated()
    for name, fn in providers.items():
        fn()  # warm-up (and compilation)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        peak = torch.cuda.max_memory_allocated() - base
        rows.append({"provider": name, "batch": batch, "img": img, "median_ms": ms[0], "p20_ms": ms[1],
                     "p80_ms": ms[2], "x_dram_floor": ms[0] / floor_ms, "peak_extra_mb": peak / 2**20})  # fmt: skip
    ref = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_reference"] = ref / r["median_ms"]
    return rows, floor_ms


def no_sync_check(batch, img):
    model, p, targets = cuda_inputs(batch, img)
    forward_backward(p, targets, model, "triton")  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(p, targets, model, "triton")
        return "passed"
    except RuntimeError as error:
        return f"FAILED: {error}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def cuda_graph_check(batch, img):
    model, p, targets = cuda_inputs(batch, img)
    eager_loss, _ = forward_backward(p, targets, model, "triton")
    eager = [eager_loss.detach().clone()] + [x.grad.clone() for x in p]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward_backward(p, targets, model, "triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for x in p:
        x.grad = None
    with torch.cuda.graph(graph):
        loss, _ = yk.compute_loss(p, targets, model, backend="triton", validate=False)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [loss.detach()] + [x.grad for x in p]
    same = all(torch.equal(a, b) for a, b in zip(eager, replayed))
    return "replay identical to eager" if same else "FAILED: replay differs from eager"


def train_step_graph_check(batch=8, img=256):
    """A whole training step (yolov3-tiny forward, triton loss, backward, SGD step) captured in a
    CUDA graph and replayed: the losses of replayed steps equal eager steps from the same state."""
    from yolo_kernels.train import SyntheticShapes, build_model

    torch.manual_seed(0)
    model = build_model("yolov3-tiny", 6).cuda()
    images, targets = (t.cuda() for t in SyntheticShapes(6).batch(batch, img, torch.Generator().manual_seed(0)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # stateless: replays restart from the same state

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss, _ = yk.compute_loss(model(images), targets, model, backend="triton", validate=False)
        loss.backward()
        optimizer.step()
        return loss

    eager = [step().detach().clone() for _ in range(3)]
    model.load_state_dict(state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        step()
    torch.cuda.current_stream().wait_stream(side)
    model.load_state_dict(state)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    model.load_state_dict(state)  # in place: the graph's parameters and buffers
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append(static_loss.detach().clone())
    torch.cuda.synchronize()
    close = all(torch.allclose(a, b, rtol=1e-4) for a, b in zip(eager, replayed))
    return "training step replays like eager" if close else f"FAILED: eager {eager} vs replayed {replayed}"


def markdown(report) -> str:
    lines = [f"# Triton loss on {report['device']}", "", f"{report['versions']}", "", "## Parity vs the reference", "",
             "| dtype | batch | img | loss rel err | grad rel err |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['dtype']} | {r['batch']} | {r['img']} | {r['loss_rel_err']:.1e} | {r['grad_rel_err']:.1e} |"
              for r in report["parity"]]  # fmt: skip
    lines += ["", f"## Forward + backward (copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s)", "",
              "| provider | batch | img | median ms | p20-p80 ms | x DRAM floor | vs reference | peak extra MB |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["speed"]:
        lines.append(f"| {r['provider']} | {r['batch']} | {r['img']} | {r['median_ms']:.3f} | "
                     f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {r['x_dram_floor']:.2f} | "
                     f"{r['speedup_vs_reference']:.1f}x | {r['peak_extra_mb']:.1f} |")  # fmt: skip
    lines += ["", f"No host sync (set_sync_debug_mode('error')): {report['no_sync']}",
              f"CUDA graph capture: {report['cuda_graph']}",
              f"CUDA graph of a whole training step: {report.get('train_step_graph', 'not run')}", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--img", type=int, nargs="+", default=[416, 640])
    parser.add_argument("--quick", action="store_true", help="skip torch.compile")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_report: no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth(device)
    report = {
        "device": name,
        "versions": f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}",
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "parity": parity(args.batch[0], args.img[0]),
        "speed": [],
        "floor_ms": {},
    }
    for img in args.img:
        for batch in args.batch:
            rows, floor_ms = speed(batch, img, bandwidth, args.quick)
            report["speed"] += rows
            report["floor_ms"][f"{batch}x{img}"] = floor_ms
    report["no_sync"] = no_sync_check(args.batch[0], args.img[0])
    report["cuda_graph"] = cuda_graph_check(args.batch[0], args.img[0])
    report["train_step_graph"] = train_step_graph_check()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower())
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
