"""Segmenter interface, the basic (GrabCut) back-end, back-end choice, SAM weight import and the CLI."""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam3d_core.inputs.imageio import InputError
from sam3d_core.segment import BASIC_LABEL, Prompt, available_backends, load_segmenter, mask_iou
from sam3d_core.segment import weights as W
from sam3d_core.segment.sam1 import filter_objects
from sam3d_core.weights.store import CheckpointError

pytest.importorskip("cv2", reason="the basic back-end needs opencv-python-headless")
from sam3d_core.cli.segment import add_segment_parser  # noqa: E402
from sam3d_core.segment.basic import BasicSegmenter  # noqa: E402

EVAL = Path(__file__).resolve().parent.parent / "assets" / "segment_eval"


def _photo(name: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.asarray(Image.open(EVAL / f"{name}.jpg").convert("RGB")),
        np.asarray(Image.open(EVAL / f"{name}_mask.png")) > 0,
    )


@pytest.fixture(scope="module")
def vase():
    image, ref = _photo("chelsea_vase")
    seg = BasicSegmenter(work_long_side=256)  # smaller than the default to keep the test fast
    seg.set_image(image)
    return seg, image, ref


def test_prompt_validation_names_value_and_fix():
    with pytest.raises(ValueError, match=r"point \(700, 10\) lies outside the 640x480 image"):
        Prompt(points=((700, 10, 1),)).validate(480, 640)
    with pytest.raises(ValueError, match="x0 < x1"):
        Prompt(box=(50, 50, 10, 80)).validate(480, 640)
    with pytest.raises(ValueError, match="prompt is empty"):
        Prompt().validate(480, 640)
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        BasicSegmenter().set_image(np.zeros((10, 10), np.uint8))


def test_basic_box_click_and_refine(vase):
    seg, image, ref = vase
    assert seg.is_basic and seg.name == BASIC_LABEL
    box = (290, 105, 400, 262)
    a = seg.predict(Prompt(box=box))
    assert len(a) == 1 and a[0].mask.shape == image.shape[:2] and a[0].mask.dtype == bool
    assert mask_iou(a[0].mask, ref) > 0.8
    assert np.array_equal(seg.predict(Prompt(box=box))[0].mask, a[0].mask)  # seeded: reproducible
    # a negative click on the vase's foot takes at least the clicked disc out of the mask
    assert a[0].mask[248, 345]
    neg = seg.predict(Prompt(points=((345, 248, 0),), box=box, mask_input=a[0].mask))[0]
    assert not neg.mask[248, 345] and neg.area < a[0].area
    click = seg.predict(Prompt(points=((330, 180, 1),)))[0]  # one click: weaker, but on the object
    assert click.mask[180, 330] and (click.mask & ref).sum() > 0.5 * click.area


def test_basic_box_on_featureless_noise_keeps_the_prompt():
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    seg = BasicSegmenter()
    seg.set_image(noise)
    m = seg.predict(Prompt(box=(15, 10, 50, 40)))[0].mask  # colours cannot separate anything here
    assert m[25, 32] and m.sum() > 0.3 * 35 * 30 and not m[:10].any() and not m[:, 50:].any()


def test_gmm_start_is_deterministic_and_in_opencv_layout():
    from sam3d_core.segment.basic import gmm_model

    rng = np.random.default_rng(1)
    dark, light = rng.normal(30, 3, (300, 3)), rng.normal(200, 3, (100, 3))
    m = gmm_model(np.concatenate([dark, light]), k=2)
    assert m.shape == (1, 26) and np.array_equal(m, gmm_model(np.concatenate([dark, light]), k=2))
    w, means = m[0, :2], m[0, 2:8].reshape(2, 3)
    order = np.argsort(means[:, 0])
    assert np.allclose(w[order], [0.75, 0.25]) and np.allclose(means[order, 0], [30, 200], atol=1)
    cov = m[0, 8:].reshape(2, 3, 3)[order[0]]
    assert np.allclose(np.diag(cov), 9, rtol=0.3)  # the dark cluster's variance (sigma 3)


def test_guided_filter_snaps_a_blurred_mask_to_the_photo_edge():
    from sam3d_core.segment.basic import guided_filter

    guide = np.zeros((40, 40), np.float32)
    guide[:, 21:] = 1.0  # the photo's edge: the object starts at column 21

    def first_object_column(p):
        return int(np.argmax(p[0] >= 0.5))

    for off_edge, expected in ((19, 21), (23, 22)):  # an upsampled mask's blurry edge, 2 px off either side
        ramp = np.tile(np.clip((np.arange(40) - off_edge + 6) / 12, 0, 1), (40, 1)).astype(np.float32)
        assert first_object_column(ramp) == off_edge
        assert first_object_column(guided_filter(guide, ramp, radius=4)) == expected  # moved to / toward 21


def test_basic_segment_all_returns_large_regions(vase):
    seg, image, _ = vase
    small = BasicSegmenter(work_long_side=160)
    small.set_image(image)
    objs = small.segment_all()
    assert 0 < len(objs) <= 5  # at least one region, at most the documented five
    assert all(o.mask.shape == image.shape[:2] and o.area >= 0.02 * image.shape[0] * image.shape[1] for o in objs)
    assert [o.area for o in objs] == sorted((o.area for o in objs), reverse=True)


def test_filter_objects_drops_background_parts_and_crumbs():
    h = w = 100

    def box(x0, y0, x1, y1):
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
        return m

    masks = [
        box(0, 0, 100, 80),  # background: 80 % of the image
        box(10, 10, 50, 50),  # an object
        box(15, 15, 30, 30),  # a part of it
        box(60, 60, 90, 95),  # another object
        box(0, 99, 3, 100),
    ]  # a crumb
    assert filter_objects(masks, [0.9] * 5) == [1, 3]


def test_auto_choice_says_which_and_why(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path))
    status = {s.name: s for s in available_backends()}
    assert list(status) == ["sam2", "sam", "basic", "sam3"] and status["basic"].usable
    assert not status["sam2"].usable and not status["sam"].usable  # nothing imported in this empty data dir
    assert not status["sam3"].usable  # concept prompts (text / exemplars); never chosen for clicks
    seg = load_segmenter("auto")
    assert seg.is_basic and seg.reason.startswith(BASIC_LABEL) and "sam:" in seg.reason and "sam2:" in seg.reason
    for name in ("sam", "sam2"):
        with pytest.raises(ValueError, match=f"backend '{name}' is not usable"):
            load_segmenter(name)
    with pytest.raises(ValueError, match="expected auto, sam2, sam or basic"):
        load_segmenter("grabcut")
    with pytest.raises(ValueError, match="'sam3' answers concept prompts"):
        load_segmenter("sam3")


# ---------------------------------------------------------------------------------------------
# SAM weights: import, verify, remove; corrupted and malicious files


def _fake_sam_state() -> dict[str, torch.Tensor]:
    """Tensors under SAM's three prefixes (the import path is format-level, not model-level)."""
    g = torch.Generator().manual_seed(0)
    return {
        "image_encoder.patch_embed.proj.weight": torch.randn(768, 3, 16, 16, generator=g),
        "prompt_encoder.point_embeddings.0.weight": torch.randn(1, 256, generator=g),
        "mask_decoder.iou_token.weight": torch.randn(1, 256, generator=g),
    }


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_weights_import_verify_remove(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    src = tmp_path / "sam_vit_b_01ec64.pth"
    state = _fake_sam_state()
    torch.save(state, src)
    dest = W.import_sam_checkpoint(src)
    assert dest == tmp_path / "home" / "segment" / "vit_b"
    assert [m["name"] for m in W.list_sam()] == ["vit_b"] and W.verify("vit_b") == []
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["source_file"]["sha256"] == W.sha256_file(src)
    model_type, loaded, digest = W.load_sam_state("vit_b")
    assert model_type == "vit_b" and len(digest) == 64
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        W.import_sam_checkpoint(src)

    blob = dest / "sam.safetensors"  # flip one byte: the hash check must catch it before loading
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert "sha256 differs" in W.verify("vit_b")[0]
    with pytest.raises(CheckpointError, match="failed its integrity check.*Re-import"):
        W.load_sam_state("vit_b")
    assert W.remove("vit_b") == dest and not dest.exists()
    with pytest.raises(CheckpointError, match="no imported SAM checkpoint 'vit_b'.*sam_vit_h_4b8939.pth"):
        W.load_sam_state("vit_b")


def test_weights_refuse_corrupt_and_malicious(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.pth"
    torch.save(_fake_sam_state(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        W.import_sam_checkpoint(truncated)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        W.import_sam_checkpoint(bad_st)

    evil_zip = tmp_path / "evil.pth"  # a torch.save file whose pickle calls os.system
    torch.save({"image_encoder.x": _RunsCode()}, evil_zip)
    evil_raw = tmp_path / "evil_raw.pth"  # a bare pickle, the legacy format
    evil_raw.write_bytes(pickle.dumps({"image_encoder.x": _RunsCode()}, protocol=2))
    for evil in (evil_zip, evil_raw):
        with pytest.raises(CheckpointError, match="refused"):
            W.import_sam_checkpoint(evil)
    assert not (tmp_path / "pwned_by_checkpoint").exists()

    not_sam = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, not_sam)
    with pytest.raises(CheckpointError, match="not a segment-anything or SAM 2 checkpoint"):
        W.import_sam_checkpoint(not_sam)
    assert W.list_sam() == []


# ---------------------------------------------------------------------------------------------
# CLI, through a fresh parser as the main CLI wires it


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sam3d")
    add_segment_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["segment", *argv])
    return args.func(args)


def test_cli_box_and_all(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    photo = tmp_path / "small.png"
    Image.open(EVAL / "chelsea_vase.jpg").resize((226, 150)).save(photo)
    out = tmp_path / "mask.png"
    assert _run([str(photo), "--box", "127,50,200,120", "--point", "165,90", "--out", str(out)]) == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (150, 226) and set(np.unique(mask)) <= {0, 255} and mask[90, 165] == 255
    assert "segmenter: basic (no weights)" in capsys.readouterr().out

    assert _run([str(photo), "--all", "--backend", "basic", "--out", str(tmp_path / "all")]) == 0
    index = json.loads((tmp_path / "all" / "objects.json").read_text())
    assert index["basic"] and index["backend"] == BASIC_LABEL
    for rec in index["objects"]:
        assert (tmp_path / "all" / rec["mask"]).is_file() and len(rec["box_xyxy"]) == 4


def test_cli_errors_name_the_value(tmp_path):
    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 48)).save(photo)
    with pytest.raises(ValueError, match=r"point \(100, 5\) lies outside the 64x48 image"):
        _run([str(photo), "--point", "100,5", "--out", str(tmp_path / "m.png")])
    bad = tmp_path / "not_a_photo.png"
    bad.write_text("hello")
    with pytest.raises(InputError, match="not an image Pillow can read"):  # the reader reconstruct uses
        _run([str(bad), "--point", "1,1", "--out", str(tmp_path / "m.png")])
    with pytest.raises(InputError, match="does not exist"):
        _run([str(tmp_path / "missing.jpg"), "--point", "1,1", "--out", str(tmp_path / "m.png")])
    with pytest.raises(ValueError, match="give one of: --all, a click prompt"):
        _run([str(photo), "--out", str(tmp_path / "m.png")])
    with pytest.raises(SystemExit):
        _run([str(photo), "--point", "3;4", "--out", str(tmp_path / "m.png")])


def test_prompt_as_arrays_for_the_sam_predictors():
    coords, labels, box = Prompt(points=((10, 20.5, 1), (3, 4, 0)), box=(1, 2, 30, 40)).as_arrays()
    assert coords.dtype == np.float32 and coords.tolist() == [[10, 20.5], [3, 4]]
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0]
    assert box.dtype == np.float32 and box.tolist() == [1, 2, 30, 40]
    assert Prompt(box=(0, 0, 5, 5)).as_arrays()[:2] == (None, None)
    assert Prompt(points=((1, 1, 1),)).as_arrays()[2] is None
