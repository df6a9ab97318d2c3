import importlib.metadata as md


def test_no_forbidden_packages_installed():
    names = {(d.metadata["Name"] or "").lower() for d in md.distributions()}
    assert not names & {"torchvision", "timm", "grad-cam", "pytorch-grad-cam"}


def test_torch_is_the_pinned_cpu_build():
    assert md.version("torch").startswith("2.13.0")


def test_console_script_declared():
    eps = [e for e in md.entry_points(group="console_scripts") if e.name == "medlens"]
    assert eps and eps[0].value == "medlens.cli.main:main"
