"""Every `sam3d` subcommand against a table of bad inputs: each is one line naming the problem and the fix, exit code
2, never a traceback; inputs that can be checked before the model loads are refused before it loads (issue 11)."""

from __future__ import annotations

import os
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sam3d_core.cli.main import main

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = Path(__file__).parent / "fixtures" / "stage1_small" / "official"
TINY = ["--model", "tiny", "--device", "cpu", "--steps", "1", "--texture-size", "64", "--faces", "300"]
TINY += ["--max-voxels", "100", "--depth-model", "none"]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height, with one tiny (truncated) IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def _official_copy(root: Path, name: str) -> Path:
    dst = root / name
    shutil.copytree(OFFICIAL, dst)
    return dst


def _alias_bomb(levels: int = 9) -> list:
    """A list whose YAML dump is about 1 KB through anchors and aliases, and 9**9 strings once expanded."""
    node: list = ["lol"] * 9
    for _ in range(levels - 1):
        node = [node] * 9  # the same object 9 times: yaml.dump writes it once, then aliases
    return node


@pytest.fixture(scope="module")
def F(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(d / "photo.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:40, 15:50] = 255
    Image.fromarray(mask).save(d / "mask.png")
    (d / "text.png").write_text("hello, not an image\n")
    _png_header_only(d / "bomb.png", 20000, 20000)
    full = (d / "photo.png").read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "a_file").write_text("an existing file")
    (d / "text.npy").write_text("hello, not an array\n")
    depth = np.ones((48, 64), np.float32)
    for name, value in (("nan", np.nan), ("inf", np.inf), ("zero", 0.0), ("negative", -1.0)):
        bad = depth.copy()
        bad[5, 5] = value
        np.save(d / f"{name}.npy", bad)
    np.save(d / "small.npy", np.ones((24, 32), np.float32))
    (d / "random.pth").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "text.pth").write_text("hello\n" * 50)
    # official folders, each broken in one way
    torch.save([torch.zeros(2)], _official_copy(d, "ckpt_list") / "ss_decoder.ckpt")
    raw = torch.load(OFFICIAL / "ss_decoder.ckpt", weights_only=True)
    torch.save({1: next(iter(raw.values())), **raw}, _official_copy(d, "ckpt_int_key") / "ss_decoder.ckpt")
    y = _official_copy(d, "yaml_missing") / "ss_generator.yaml"
    data = yaml.safe_load(y.read_text())
    del data["module"]["generator"]["backbone"]["reverse_fn"]["backbone"]["model_channels"]
    y.write_text(yaml.safe_dump(data))
    y = _official_copy(d, "yaml_bomb") / "ss_generator.yaml"
    data = yaml.safe_load(y.read_text())
    data["module"]["condition_embedder"]["backbone"]["embedder_list"] = _alias_bomb()
    y.write_text(yaml.dump(data))
    assert y.stat().st_size < 8000  # a small file ...
    os.symlink("loop", d / "loop")  # a folder that is a symlink loop
    manifest_home = d / "home_no_files" / "models" / "m"
    manifest_home.mkdir(parents=True)
    (manifest_home / "manifest.json").write_text('{"format": 1}')
    (d / "empty_home").mkdir()
    return {p.name: str(p) for p in d.iterdir()} | {"dir": str(d)}


# (argv with {placeholders} from F, words the one error line must hold, refused before any model loads)
CASES = [
    # photos
    ("stage1 {text.png} --mask {mask.png} --model tiny --out {dir}/o", ["not an image Pillow can read"], True),
    ("stage1 {bomb.png} --mask {mask.png} --model tiny --out {dir}/o", ["decompression-bomb guard"], True),
    ("stage1 {truncated.png} --mask {mask.png} --model tiny --out {dir}/o", ["truncated or corrupt"], True),
    ("reconstruct {text.png} --mask {mask.png} --out {dir}/o", ["not an image Pillow can read"], True),
    ("reconstruct {bomb.png} --mask {mask.png} --out {dir}/o", ["decompression-bomb guard"], True),
    ("reconstruct {truncated.png} --mask {mask.png} --out {dir}/o", ["truncated or corrupt"], True),
    ("scene {bomb.png} --out {dir}/o", ["decompression-bomb guard"], True),
    ("segment {truncated.png} --point 3,3 --out {dir}/m.png", ["truncated or corrupt"], True),
    ("reconstruct {photo.png} --mask {text.png} --out {dir}/o", ["mask", "not an image Pillow can read"], True),
    # clicks and boxes
    ("segment {photo.png} --box 0,0,inf,inf --out {dir}/m.png", ["--box", "finite numbers"], True),
    ("reconstruct {photo.png} --box 0,0,inf,inf --out {dir}/o", ["--box", "finite numbers"], True),
    ("segment {photo.png} --point 10,10,- --out {dir}/m.png", ["every --point excludes", "--box"], True),
    ("reconstruct {photo.png} --point 10,10,- --out {dir}/o", ["every --point excludes"], True),
    ("segment {photo.png} --point nan,3 --out {dir}/m.png", ["--point"], True),
    # output locations
    ("reconstruct {photo.png} --mask {mask.png} --out {a_file}", ["--out folder", "is a file"], True),
    ("scene {photo.png} --out {a_file}", ["is a file"], True),
    ("stage1 {photo.png} --mask {mask.png} --model tiny --out {a_file}", ["is a file"], True),
    ("demo --out {a_file}", ["is a file"], True),
    ("segment {photo.png} --all --out {a_file}", ["is a file"], True),
    ("segment {photo.png} --point 3,3 --out {dir}", ["is a folder"], True),
    ("segment {photo.png} --point 3,3 --out {photo.png}", ["this job's inputs"], True),
    ("reconstruct {photo.png} --mask {mask.png} --out {a_file}/sub", ["is a file, not a folder"], True),
    # depth maps: refused before the model runs
    ("reconstruct {photo.png} --mask {mask.png} --depth {text.npy} --out {dir}/o", ["not a NumPy .npy file"], True),
    ("reconstruct {photo.png} --mask {mask.png} --depth {nan.npy} --out {dir}/o", ["1 NaN", "> 0"], True),
    ("reconstruct {photo.png} --mask {mask.png} --depth {inf.npy} --out {dir}/o", ["1 infinite"], True),
    ("reconstruct {photo.png} --mask {mask.png} --depth {zero.npy} --out {dir}/o", ["1 zero or negative"], True),
    ("reconstruct {photo.png} --mask {mask.png} --depth {negative.npy} --out {dir}/o", ["zero or negative"], True),
    ("reconstruct {photo.png} --mask {mask.png} --depth {small.npy} --out {dir}/o", ["32x24", "64x48"], True),
    ("reconstruct {photo.png} --mask {mask.png} --fov inf --out {dir}/o", ["--fov inf"], True),
    ("scene {photo.png} --max-objects 0 --out {dir}/o", ["--max-objects 0"], True),
    # weights
    ("weights import {loop}", ["cannot be opened"], True),
    ("weights import {ckpt_list}", ["ss_decoder.ckpt holds a list, not a dict of tensors"], True),
    ("weights import {ckpt_int_key}", ["has a key of type int, not a tensor name"], True),
    ("weights import {yaml_missing}", ["ss_generator.yaml", "field 'model_channels' is missing"], True),
    ("weights import-sam {random.pth}", ["cannot be read as a PyTorch checkpoint", "not a pickle"], True),
    ("weights import-sam {text.pth}", ["cannot be read as a PyTorch checkpoint"], True),
    ("weights import-depth {random.pth}", ["cannot be read as a PyTorch checkpoint"], True),
    ("weights import {dir} --name ../escape", ["a name is a name, not a path"], True),
    ("weights import-sam {random.pth} --name a/b", ["a name is a name"], True),
    ("weights verify .", ["a name is a name"], True),
    ("weights remove ..", ["a name is a name"], True),
    ("weights download sam-vit_b --dest {dir}/dl", ["pass --yes"], True),
    ("serve --max-voxels 3", ["--max-voxels 3"], True),
    ("serve --device bogus", ["--device 'bogus'"], True),
]


def _argv(template: str, files: dict[str, str]) -> list[str]:
    out = []
    for word in template.split():
        for key, value in files.items():
            word = word.replace("{" + key + "}", value)
        out.append(word)
    return out


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = int(e.code)
    out, err = capsys.readouterr()
    return rc, out + err


@pytest.mark.parametrize(
    "template, words, early", CASES, ids=[c[0].split("{")[0].strip() + f"-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_is_one_line_with_the_fix_and_exit_code_2(F, template, words, early, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SAM3D_HOME", F["empty_home"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # no terminal: nothing may wait for an answer
    before = sorted(os.listdir(F["dir"]))
    rc, text = _run(_argv(template, F), capsys)
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert rc == 2 and len(errors) == 1, text
    line = errors[0]
    assert line.startswith("sam3d"), line
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    if early:
        assert "model:" not in text, "refused only after the model was loaded"
    assert sorted(os.listdir(F["dir"])) == before and not list(tmp_path.iterdir())  # nothing written anywhere


def test_a_nul_byte_in_a_path_is_named(F, capsys):
    rc, text = _run(["segment", F["photo.png"], "--point", "3,3", "--out", "m\0.png"], capsys)
    assert rc == 2 and "NUL byte" in text and "Traceback" not in text


def test_verify_of_a_manifest_without_files(F, capsys, monkeypatch):
    monkeypatch.setenv("SAM3D_HOME", str(Path(F["dir"]) / "home_no_files"))
    rc, text = _run(["weights", "verify", "m"], capsys)
    assert rc == 2 and 'manifest.json lists no "files"' in text and "Traceback" not in text


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(F, tmp_path):
    """A 1 KB YAML whose aliases expand to 9**9 values used to end in a MemoryError at 6 GB. Run in a child with
    a 3 GB address-space limit, so that a regression fails this test instead of exhausting the machine."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    env = {**os.environ, "PYTHONPATH": str(REPO), "SAM3D_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [sys.executable, "-m", "sam3d_core.cli", "weights", "import", F["yaml_bomb"]],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "alias bomb" in run.stderr and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1


def test_a_photo_at_the_pixel_limit_opens_in_bounded_memory(tmp_path):
    """A 10000 x 10000 photo (the 100 MP limit) took 5.9 GB to load and give a point map (full-size copies of the
    decoded image, a float64 meshgrid of the downscaled 67 MP photo); now about 1.8 GB. Measured as the peak
    resident memory of a child that does only that (stage-1 preprocessing at 67 MP is not covered here)."""
    make = """
import sys
import numpy as np
from PIL import Image
row = np.arange(10000, dtype=np.uint16)
img = np.empty((10000, 10000, 3), np.uint8)
for y in range(10000):
    img[y, :, 0], img[y, :, 1], img[y, :, 2] = row % 256, y % 256, (row + y) % 256
Image.fromarray(img).save(sys.argv[1], compress_level=1)
"""
    measure = """
import resource, sys
from sam3d_core.inputs.imageio import load_photo
from sam3d_core.pipeline.reconstruct import Pipeline
pipe, _ = Pipeline.load("tiny", "cpu", stage2=False)
photo = load_photo(sys.argv[1])
ctx = pipe.open_photo(photo, depth_model="none")
assert ctx.pointmap.shape == (8192, 8192, 3) and photo.source_width == 10000
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAM3D_HOME": str(tmp_path / "home")}
    big = str(tmp_path / "big.png")
    subprocess.run([sys.executable, "-c", make, big], check=True, timeout=600)
    run = subprocess.run([sys.executable, "-c", measure, big], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    peak_mb = int(run.stdout.split()[-1])
    assert peak_mb < 2600, f"{peak_mb} MB to load a 100 MP photo and make its point map"
