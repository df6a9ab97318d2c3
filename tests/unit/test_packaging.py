import importlib.metadata as md


def test_no_forbidden_packages_installed():
    names = {(d.metadata["Name"] or "").lower() for d in md.distributions()}
    assert not names & {"torchvision", "timm", "grad-cam", "pytorch-grad-cam"}


def test_torch_is_the_pinned_cpu_build():
    import torch

    assert md.version("torch").startswith("2.13.0")
    assert torch.version.cuda is None and not torch.backends.cuda.is_built()  # built without CUDA
    assert torch.version.hip is None
    names = {(d.metadata["Name"] or "").lower() for d in md.distributions()}
    assert not {n for n in names if n.startswith("nvidia-") or n == "triton"}  # no CUDA runtime wheels
    libs = [f.name for f in (md.distribution("torch").locate_file("torch") / "lib").iterdir()]
    assert "libtorch_cpu.so" in libs and not [f for f in libs if "cuda" in f or "cudnn" in f or "nccl" in f]


def test_console_script_declared():
    eps = [e for e in md.entry_points(group="console_scripts") if e.name == "medlens"]
    assert eps and eps[0].value == "medlens.cli.main:main"
