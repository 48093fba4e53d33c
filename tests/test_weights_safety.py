"""Weight commands never touch anything outside the models folder, delete only what our manifest lists, and a
broken model folder is listed as broken and skipped, never fatal (issue 11)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sam3d_core.cli.main import main
from sam3d_core.weights import hub

OFFICIAL = Path(__file__).parent / "fixtures" / "stage1_small" / "official"


def cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def imported(home, tmp_path) -> Path:
    src = tmp_path / "checkpoints"
    shutil.copytree(OFFICIAL, src)
    assert cli(["weights", "import", str(src), "--name", "mymodel"]) == 0
    return home / "models" / "mymodel"


def _user_project(folder: Path) -> dict[str, bytes]:
    """A user's folder that happens to hold a manifest.json (and their work)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text('{"files": {"scene.blend": {"sha256": "x", "bytes": 4}}}')
    (folder / "scene.blend").write_bytes(b"work")
    (folder / "notes.txt").write_text("months of work")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_remove_looks_only_in_the_models_folder(imported, tmp_path, monkeypatch, capsys):
    """`weights remove NAME` used to resolve NAME against the current folder first and delete ./NAME."""
    monkeypatch.chdir(tmp_path)
    project = _user_project(tmp_path / "mymodel")
    assert cli(["weights", "remove", "mymodel"]) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "mymodel").iterdir()} == project
    assert not imported.exists()  # the model itself is gone
    assert str(imported) in capsys.readouterr().out


@pytest.mark.parametrize("name", [".", "..", "./mymodel", "../home/models/mymodel"])
def test_remove_refuses_names_that_are_paths(imported, tmp_path, monkeypatch, capsys, name):
    """`weights remove .` used to empty the current folder."""
    work = tmp_path / "work"
    project = _user_project(work)
    monkeypatch.chdir(work)
    assert cli(["weights", "remove", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sam3d: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in work.iterdir()} == project
    assert (imported / "manifest.json").is_file()  # and the model is untouched


def test_import_name_cannot_escape_the_models_folder(home, tmp_path, capsys):
    """`weights import DIR --name ./../../victim --overwrite` used to delete victim/ and put the model there."""
    src = tmp_path / "checkpoints"
    shutil.copytree(OFFICIAL, src)
    victim = tmp_path / "victim"
    project = _user_project(victim)
    for name in ("./../../victim", "../../victim", str(victim), "a/b"):
        assert cli(["weights", "import", str(src), "--name", name, "--overwrite"]) == 2
        assert "a name is a name, not a path" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == project
    assert not (home / "models").exists() or not any((home / "models").iterdir())


def test_import_overwrite_replaces_only_a_model_folder_of_ours(home, tmp_path, capsys):
    src = tmp_path / "checkpoints"
    shutil.copytree(OFFICIAL, src)
    folder = home / "models" / "official"
    project = _user_project(folder)  # not ours: its manifest lists a file we never write
    (folder / "manifest.json").write_text("{}")
    project["manifest.json"] = b"{}"
    assert cli(["weights", "import", str(src), "--overwrite"]) == 2
    assert 'lists no "files"' in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == project


def test_remove_deletes_only_what_the_manifest_lists(imported, capsys):
    listed = set(json.loads((imported / "manifest.json").read_text())["files"])
    (imported / "my_notes.txt").write_text("not a model file")
    assert cli(["weights", "remove", "mymodel"]) == 2
    assert "my_notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in imported.iterdir()) == ["my_notes.txt"]
    assert listed and not any((imported / f).exists() for f in listed)


def test_a_manifest_listing_paths_is_refused_not_followed(home, tmp_path, capsys):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    folder = home / "models" / "evil"
    folder.mkdir(parents=True)
    rec = {"sha256": "0" * 64, "bytes": 4}
    (folder / "manifest.json").write_text(json.dumps({"files": {"../../../precious.txt": rec}}))
    assert cli(["weights", "remove", "evil"]) == 2
    assert "not a plain file name" in capsys.readouterr().err
    assert outside.read_text() == "keep"


def test_a_broken_manifest_is_listed_as_broken_and_skipped(imported, home, capsys):
    """One broken manifest.json used to break `weights list`, `reconstruct --model tiny` and `serve`."""
    broken = home / "models" / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"format": 1, "name": "broken"')  # cut off
    assert cli(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "mymodel" in out and "BROKEN" in out and "broken" in out and "manifest.json" in out
    assert [m["name"] for m in hub.list_models()] == ["mymodel"]
    from sam3d_core.pipeline.reconstruct import Pipeline

    pipe, which = Pipeline.load("tiny", "cpu", stage2=False)
    assert "tiny" in which
    pipe, which = Pipeline.load(None, "cpu", stage2=False)  # the default choice skips it too
    assert "tiny" in which
    assert cli(["weights", "verify", "broken"]) == 2
    err = capsys.readouterr().err
    assert "broken/manifest.json cannot be read" in err and err.count("\n") == 1


def test_verify_of_a_manifest_without_files_names_it(imported, capsys):
    (imported / "manifest.json").write_text('{"format": 1}')
    assert cli(["weights", "verify", "mymodel"]) == 2
    err = capsys.readouterr().err
    assert f'{imported}/manifest.json lists no "files"' in err and "re-import" in err
