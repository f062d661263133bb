"""Installing the package beyond the development setup: without the C++ extension (disabled, or no
compiler at all) it installs as pure Python with its packaged cfgs, the reference runs, and
``backend="auto"`` warns once that the fast CPU path is missing, with the reason and the fix."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent(
    """
    import os, sys, warnings
    import torch
    import yolo_kernels as yk
    assert yk.__file__.startswith(sys.argv[1]), yk.__file__          # the installed copy, not the source tree
    assert not any(f.startswith("_C") for f in os.listdir(os.path.dirname(yk.__file__)))
    print("backends:", yk.available_backends("cpu"))
    print("ops:", sorted(n for n in yk.library.SCHEMAS if hasattr(torch.ops.yolo_kernels, n)))
    model = yk.models.Darknet("yolov4")                               # a packaged cfg
    model.hyp = dict(yk.DEFAULT_HYP)
    p = [x.detach() for x in model.train()(torch.rand(1, 3, 64, 64))]
    targets = torch.tensor([[0, 3, 0.5, 0.5, 0.3, 0.4]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = yk.compute_loss(p, targets, model)[1]
        yk.compute_loss(p, targets, model)
    ref = yk.compute_loss(p, targets, model, backend="reference")[1]
    assert torch.equal(auto, ref)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    print("warnings:", len(messages))
    print("warning:", messages[0])
    print("warned at:", [w.filename for w in caught if issubclass(w.category, RuntimeWarning)][0])
    from yolo_kernels import info
    print(info.format_report(info.report()))
    try:
        yk.compute_loss(p, targets, model, backend="cpp")
    except yk.BackendUnavailableError as error:
        print("cpp error:", error)
    """
)


def clean_python(tmp_path) -> str:
    """A venv that sees this environment's packages (torch, triton) but not the development install
    of yolo_kernels: a .pth file adds the site-packages folder, whose own .pth files (the
    editable install's import hook among them) are then not processed."""
    import site
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = sysconfig.get_paths()["purelib"]
    dirs = [purelib] + [d for d in site.getsitepackages() if d != purelib]
    clean_site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(clean_site, "deps.pth"), "w") as f:
        f.write("\n".join(dirs) + "\n")
    return str(venv / "bin" / "python")


def install_and_check(tmp_path, env_extra, path=None):
    target = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_KERNELS_REQUIRE_EXT", "CXX", "TRITON_INTERPRET")}
    env.update(env_extra)
    if path is not None:
        env["PATH"] = path
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--verbose",
            "--no-deps",
            "--no-build-isolation",
            "--no-compile",
            "--target",
            str(target),
            ROOT,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    env["PYTHONPATH"] = str(target)
    env["PATH"] = os.environ.get("PATH", "")
    run = subprocess.run(
        [clean_python(tmp_path), "-c", CHECK, str(target)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return build, run.stdout


def test_install_with_the_extension_disabled(tmp_path):
    build, out = install_and_check(tmp_path, {"YOLO_KERNELS_NO_EXT": "1"})
    assert "building without the C++ extension: YOLO_KERNELS_NO_EXT=1 is set" in build.stdout + build.stderr
    assert "backends: ['reference']" in out
    assert (
        "ops: ['bce_with_logits', 'box_iou', 'detection_loss', 'detection_loss_backward', "
        "'detection_loss_with_grad', 'fused_loss', 'match', 'pad_targets', 'tal_assign']" in out
    )  # schemas from Python
    assert "warnings: 1" in out  # once per process, not per call
    # what is true, and a fix a pip user can run; not "partially initialized module ... circular import"
    assert "runs the slow 'reference' loss on cpu: yolo_kernels was installed without its C++ extension" in out
    assert "python -m yolo_kernels.info" in out and "pip install -v --no-build-isolation ." in out
    assert "circular import" not in out and "partially initialized" not in out and "make install" not in out
    assert "warned at: <string>" in out  # the caller's line, not a line inside the package
    assert "cpp error: backend 'cpp' cannot run on cpu" in out
    if "cuda:" not in out:  # no GPU: installing triton would not help, so it is not suggested
        assert "triton     unavailable: the triton backend runs on CUDA tensors" in out
        assert "pip install 'triton" not in out


@pytest.mark.skipif(sys.platform == "win32", reason="PATH without a compiler is set up for POSIX")
def test_install_without_a_compiler(tmp_path):
    bare = tmp_path / "bin"  # a PATH with no compiler on it
    bare.mkdir()
    build, out = install_and_check(tmp_path, {}, path=str(bare))
    assert "building without the C++ extension: no C++ compiler found" in build.stdout + build.stderr
    assert "backends: ['reference']" in out


def test_info_command_lists_backends_and_reasons():
    result = subprocess.run(
        [sys.executable, "-m", "yolo_kernels.info"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, TRITON_INTERPRET="0"),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cpu: backend='auto' uses" in out and "reference  available" in out
    assert "triton     unavailable: the triton backend runs on CUDA tensors" in out or "cuda:" in out
    assert "anchor-based (compute_loss, yolov5.ComputeLoss):" in out  # every family, its own backends
    assert "anchor-free (yolov8.DetectionLoss, E2ELoss):" in out
    as_json = subprocess.run(
        [sys.executable, "-m", "yolo_kernels.info", "--json"], cwd=ROOT, capture_output=True, text=True
    )
    assert '"backends"' in as_json.stdout and '"auto"' in as_json.stdout and '"families"' in as_json.stdout
