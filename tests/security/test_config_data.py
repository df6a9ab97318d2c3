"""Config and data-layer safety (issue 11): run names that cannot leave the runs folder, YAML alias bombs,
environment values that stay out of errors and saved configs, manifest paths confined to their image
root, and blank manifest cells refused instead of becoming a class or a patient called "nan".

Images are real PneumoniaMNIST X-rays written as PNG files; nothing is mocked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medlens.config import config_from_dict, dump_config, load_config
from medlens.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
from medlens.transforms.preprocess import prepared_data  # noqa: E402


def _prep(size: int, color: str = "gray"):
    """The preparation medlens injects into the loaders (resize to ``size``, colour mode)."""
    from medlens.transforms.preprocess import InputSpec, Preparer

    return Preparer(InputSpec(2, (size, size), color))


def _one_line_naming(err: Exception, *names: object) -> str:
    msg = str(err)
    assert "\n" not in msg
    for n in names:
        assert str(n) in msg, (n, msg)
    return msg


def _write_config(path: Path, **top) -> Path:
    d = {"name": "ok", "data": {"name": "pneumoniamnist"}}
    d.update(top)
    path.write_text(yaml.safe_dump(d))
    return path


# ----------------------------------------------------------------------------------------- run names

BAD_NAMES = ["", " ", ".", "..", "../victim", "../../x", "a/b", "/tmp/abs", "a\\b", "..\\x", ".hidden",
             "a\x00b", "a\nb"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_run_name_in_yaml_is_one_folder_name(tmp_path, bad):
    p = _write_config(tmp_path / "c.yaml", name=bad)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    _one_line_naming(e.value, p, "run name")


@pytest.mark.parametrize("bad", ["../../x", "..", ".", "''", "a/b", ".x", '"a\\0b"'])
def test_run_name_from_set_override_is_refused(tmp_path, bad):
    p = _write_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(p, [f"name={bad}"])  # what `medlens train --set name=...` calls
    _one_line_naming(e.value, p, "run name")


def test_good_run_names_and_assignment_are_checked(tmp_path):
    for good in ("exp-1", "a.b", "résumé run", "x..y"):
        assert load_config(_write_config(tmp_path / "c.yaml"), [f"name={good}"]).name == good
    cfg = load_config(_write_config(tmp_path / "c.yaml"))
    with pytest.raises(ValueError, match="run name"):
        cfg.name = "../escape"  # a validated config stays valid
    assert cfg.name == "ok"


def test_malformed_overrides_are_one_line_errors(tmp_path):
    p = _write_config(tmp_path / "c.yaml")
    for bad in ("name.x=1", "=1", "train..epochs=2", "noequals"):
        with pytest.raises(ConfigError) as e:
            load_config(p, [bad])
        _one_line_naming(e.value, p, "override")


# ------------------------------------------------------------------------------------ YAML alias bomb

def _laughs(levels: int = 9, width: int = 9, indent: str = "    ") -> str:
    lines = [f"{indent}l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines)


BOMB = "name: bomb\ndata: {name: pneumoniamnist}\nmodel:\n  name: small_cnn\n  params:\n" + _laughs() + "\n"


def test_alias_bomb_refused_in_one_line_fast_with_bounded_memory(tmp_path):
    """9^9 (387 million) strings once expanded: `train` would load, then dump config.yaml. In a child
    process capped at 2 GiB of address space and 60 s, the config must be refused in one line."""
    p = tmp_path / "bomb.yaml"
    p.write_text(BOMB)
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from medlens.config import dump_config, load_config
        from medlens.errors import ConfigError
        try:
            cfg = load_config({str(p)!r})
            dump_config(cfg)
        except ConfigError as e:
            print("REFUSED", e)
            sys.exit(3)
        print("LOADED")
    """)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    elapsed = time.monotonic() - t0
    assert r.returncode == 3, (r.returncode, r.stdout[-500:], r.stderr[-500:])
    out = r.stdout.strip()
    assert out.count("\n") == 0 and out.startswith("REFUSED") and str(p) in out and "alias" in out
    assert "MEDLENS_YAML_MAX_NODES" in out
    assert elapsed < 20


def test_merge_key_and_recursive_alias_bombs_are_refused(tmp_path):
    merge = ["name: m", "data: {name: pneumoniamnist}", "model:", "  params:",
             "    m0: &m0 {a: 1, b: 2, c: 3, d: 4}"]
    for i in range(1, 18):  # every level merges the previous one twice: about 2^19 pairs once flattened
        merge.append(f"    m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: {i}}}")
    p = tmp_path / "merge.yaml"
    p.write_text("\n".join(merge) + "\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert time.monotonic() - t0 < 5
    _one_line_naming(e.value, p, "alias")

    p.write_text("name: r\ndata: {name: pneumoniamnist}\nmodel:\n  params:\n    loop: &a [1, *a]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    _one_line_naming(e.value, p, "recursive alias")


def test_deeply_nested_yaml_is_a_one_line_error(tmp_path):
    p = tmp_path / "deep.yaml"
    p.write_text("name: d\ndata: {name: pneumoniamnist}\nmodel: {params: {x: " + "[" * 5000 + "]" * 5000 + "}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    _one_line_naming(e.value, p, "nested too deeply")


def test_alias_bomb_in_a_set_override_is_refused(tmp_path):
    p = _write_config(tmp_path / "c.yaml")
    levels = ["b0: &b0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 10)}]" for i in range(1, 8)]  # 10^8 once expanded
    flow = "{" + ", ".join(levels) + "}"
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_config(p, [f"model.params={flow}"])
    assert time.monotonic() - t0 < 5
    _one_line_naming(e.value, p, "alias")


def test_yaml_node_limit_is_an_environment_setting(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("name: n\ndata: {name: pneumoniamnist}\nmodel:\n  params:\n    widths: &w [4, 8, 16]\n"
                 "    again: [*w, *w, *w, *w]\n")  # 3 + 4 * 3 expanded scalars: about 30 nodes
    assert load_config(p).model.params["again"][3] == [4, 8, 16]
    monkeypatch.setenv("MEDLENS_YAML_MAX_NODES", "20")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    _one_line_naming(e.value, p, "more than 20 nodes")
    monkeypatch.setenv("MEDLENS_YAML_MAX_NODES", "1000")
    assert load_config(p).model.params["widths"] == [4, 8, 16]
    monkeypatch.setenv("MEDLENS_YAML_MAX_NODES", "lots")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    _one_line_naming(e.value, "MEDLENS_YAML_MAX_NODES", "positive whole number")


# --------------------------------------------------------------------------------- environment values

SECRET = "s3cr3t-value-7f1d"


@pytest.mark.parametrize("ref", ["$MEDLENS_TEST_SECRET", "${MEDLENS_TEST_SECRET}", "${HOME}", "$USER"])
@pytest.mark.parametrize("key", ["path", "image_root"])
def test_only_medlens_data_is_expanded_and_no_value_leaks(tmp_path, monkeypatch, ref, key):
    monkeypatch.setenv("MEDLENS_TEST_SECRET", SECRET)
    monkeypatch.setenv("USER", SECRET)
    monkeypatch.setenv("HOME", str(tmp_path / SECRET))
    p = tmp_path / "c.yaml"
    data = {"source": "csv", "path": "m.csv", key: f"{ref}/images"}
    p.write_text(yaml.safe_dump({"name": "env", "data": data}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = _one_line_naming(e.value, p, f"data.{key}", "MEDLENS_DATA")
    assert SECRET not in msg


@pytest.mark.parametrize("ref", ["$MEDLENS_DATA", "${MEDLENS_DATA}"])
def test_saved_config_keeps_medlens_data_unexpanded(tmp_path, monkeypatch, ref):
    local = tmp_path / f"local-{SECRET}"
    monkeypatch.setenv("MEDLENS_DATA", str(local))
    cfg = config_from_dict({"name": "d", "task": "segmentation",
                            "data": {"source": "csv", "path": f"{ref}/seg/m.csv", "image_root": f"{ref}/seg"}})
    assert cfg.data.path == f"{ref}/seg/m.csv" and cfg.data.image_root == f"{ref}/seg"
    assert cfg.data.resolved_path() == local.resolve() / "seg" / "m.csv"
    assert cfg.data.resolved_image_root() == local.resolve() / "seg"
    saved = dump_config(cfg)
    assert SECRET not in saved and str(tmp_path) not in saved and f"{ref}/seg/m.csv" in saved
    again = config_from_dict(yaml.safe_load(saved))  # a run folder's config.yaml resolves on another machine
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("MEDLENS_DATA", str(other))
    assert again.data.resolved_path() == other.resolve() / "seg" / "m.csv"
    monkeypatch.delenv("MEDLENS_DATA")  # unset: the documented default root
    assert again.data.resolved_path() == Path.home() / ".medlens" / "data" / "seg" / "m.csv"


# ----------------------------------------------------------------------------- CSV manifests (shared)

@pytest.fixture(scope="module")
def xrays(tmp_path_factory, data_root):
    """Eight real PneumoniaMNIST X-rays (4 per class) as PNG files, with their pixels."""
    from medlens.data.medmnist import load_medmnist

    test = load_medmnist("pneumoniamnist").test
    root = tmp_path_factory.mktemp("xrays")
    picks = [i for c in (0, 1) for i in np.flatnonzero(test.labels == c)[:4]]
    files = {}
    for i in picks:
        name = f"x{i:03d}.png"
        Image.fromarray(test.images[i, 0]).save(root / name)
        files[name] = (test.class_names[test.labels[i]], test.images[i, 0])
    return root, files


def _manifest(folder: Path, rows: list[tuple], header: str = "path,label,patient_id") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "manifest.csv"
    p.write_text(header + "\n" + "\n".join(",".join(str(c) for c in r) for r in rows) + "\n")
    return p


def _rows(files: dict) -> list[tuple]:
    return [(name, label, f"p{k}") for k, (name, (label, _)) in enumerate(sorted(files.items()))]


# -------------------------------------------------------------------------------------- blank labels

@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_labels_are_refused_with_file_and_lines(xrays, blank):
    from medlens.data.folder import load_csv_manifest

    root, files = xrays
    rows = _rows(files)
    rows[1] = (rows[1][0], blank, rows[1][2])
    rows[3] = (rows[3][0], blank, rows[3][2])
    csv = _manifest(root, rows)
    with pytest.raises(DataError) as e:
        load_csv_manifest(csv, _prep(28, "gray"), val=0, test=0.25)
    _one_line_naming(e.value, csv, "'label'", "line(s) 3, 5")


def test_blank_patient_ids_and_paths_are_refused(xrays):
    from medlens.data.folder import load_csv_manifest

    root, files = xrays
    rows = _rows(files)
    rows[2] = (rows[2][0], rows[2][1], "")
    csv = _manifest(root, rows)
    with pytest.raises(DataError) as e:
        load_csv_manifest(csv, _prep(28, "gray"), val=0, test=0.25)
    _one_line_naming(e.value, csv, "'patient_id'", "line(s) 4")
    rows = _rows(files)
    rows[0] = ("", rows[0][1], rows[0][2])
    csv = _manifest(root, rows)
    with pytest.raises(DataError) as e:
        load_csv_manifest(csv, _prep(28, "gray"), val=0, test=0.25)
    _one_line_naming(e.value, csv, "'path'", "line(s) 2")


def test_split_column_values_outside_train_val_test_are_refused(xrays):
    from medlens.data.folder import load_csv_manifest

    root, files = xrays
    rows = [r + (s,) for r, s in zip(_rows(files), ["train", "train", "val", "test", "train", "validation",
                                                     "val", "test"])]
    csv = _manifest(root, rows, "path,label,patient_id,split")
    with pytest.raises(DataError) as e:
        load_csv_manifest(csv, _prep(28, "gray"))
    _one_line_naming(e.value, csv, "'split'", "line(s) 7", "validation")


def test_blank_cells_in_a_segmentation_manifest_are_refused(tmp_path):
    from medlens.data.segmentation import read_manifest

    csv = _manifest(tmp_path, [("a.png", "a_mask.png", "p1"), ("b.png", "", "p2")], "path,mask,patient_id")
    with pytest.raises(DataError) as e:
        read_manifest(csv, "path", "mask", "patient_id")
    _one_line_naming(e.value, csv, "'mask'", "line(s) 3")


# ------------------------------------------------------------------------------- paths in manifests

def _escape_rows(files: dict, bad: str) -> list[tuple]:
    rows = _rows(files)
    rows[5] = (bad, rows[5][1], rows[5][2])
    return rows


@pytest.mark.parametrize("bad", ["../../../../../../../../etc/passwd", "/etc/passwd", "sub/../../outside.png"])
def test_manifest_paths_cannot_leave_the_image_root(xrays, tmp_path, bad):
    from medlens.data.folder import load_csv_manifest

    root, files = xrays
    csv = _manifest(tmp_path / "lists", _escape_rows(files, bad))
    with pytest.raises(DataError) as e:
        load_csv_manifest(csv, _prep(28, "gray"), image_root=root, val=0, test=0.25)
    _one_line_naming(e.value, csv, "outside the image root", "line 7", "data.allow_outside_root")


def test_symlink_escape_is_refused_and_the_flag_allows_it(xrays, tmp_path):

    root, files = xrays
    images = tmp_path / "images"
    images.mkdir()
    outside = tmp_path / "private"
    outside.mkdir()
    for name in files:
        (images / name).write_bytes((root / name).read_bytes())
    victim = sorted(files)[5]
    (images / victim).unlink()
    (outside / victim).write_bytes((root / victim).read_bytes())
    (images / victim).symlink_to(outside / victim)           # leads out of the root
    (images / "alias.png").symlink_to(images / sorted(files)[0])  # stays inside: fine
    rows = _rows(files) + [("alias.png", files[sorted(files)[0]][0], "p99")]
    csv = _manifest(images, rows)
    cfg = {"name": "s", "data": {"source": "csv", "path": str(csv), "size": 28, "val_fraction": 0,
                                 "test_fraction": 0.25}}
    with pytest.raises(DataError) as e:
        prepared_data(config_from_dict(cfg).data)
    _one_line_naming(e.value, csv, "outside the image root", victim)
    cfg["data"]["allow_outside_root"] = True
    data = prepared_data(config_from_dict(cfg).data)
    got = {Path(s).name: data.get(sp).images[i, 0] for sp in ("train", "val", "test")
           for i, s in enumerate(data.get(sp).sources)}
    assert len(got) == 9 and np.array_equal(got[victim], files[victim][1])


def test_segmentation_manifest_paths_are_confined(tmp_path):
    from medlens.data.segmentation import read_manifest

    (tmp_path / "a.png").write_bytes(b"")
    for column, row in (("mask", ("a.png", "../../etc/shadow", "p1")), ("path", ("/etc/hostname", "a.png", "p1")),
                        ("ref", ("a.png", "a.png", "p1", "../x.png"))):
        header = "path,mask,patient_id" + (",ref" if len(row) == 4 else "")
        csv = _manifest(tmp_path, [row], header)
        with pytest.raises(DataError) as e:
            read_manifest(csv, "path", "mask", "patient_id", reference_column="ref")
        _one_line_naming(e.value, csv, f"'{column}' on line 2", "outside the image root")
    rows = read_manifest(csv, "path", "mask", "patient_id", reference_column="ref", allow_outside_root=True)
    assert rows[0][2] == tmp_path / "../x.png"
