"""SAM 3 concept prompts against a fixture made with Meta's own `sam3` code (tests/make_sam3_fixture.py).

tests/fixtures/sam3_tiny holds a reduced SAM 3 with random weights (float16, its config in the metadata), a photo,
and for three prompts (text, exemplar boxes, both) what Meta's Sam3Processor fed the model, what the model returned
and what the processor made of it. Everywhere: our pre-processing, exemplar-box conversion and post-processing
reproduce Meta's; the import refuses wrong and truncated checkpoints; a concept prompt with no SAM 3 says how to get
it. Where `sam3` imports (it needs a torchvision whose C ops load beside torch: not the CPU CI), the back-end itself
runs the fixture's model end to end and must give the same boxes, scores and masks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sam3d_core.segment import ConceptUnavailable, SegmentSession, load_concept_segmenter
from sam3d_core.segment import weights as W
from sam3d_core.segment.sam3 import (
    OFFICIAL,
    ConceptPrompt,
    Sam3Config,
    boxes_to_model,
    import_error,
    postprocess,
    preprocess,
)
from sam3d_core.weights.store import CheckpointError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sam3_tiny"
META = json.loads((FIXTURE / "cases.json").read_text())
CASES = {c["name"]: c for c in META["cases"]}
DATA = load_file(str(FIXTURE / "cases.safetensors"))
PHOTO = np.asarray(Image.open(FIXTURE / "photo.png").convert("RGB"))
H, W_ = PHOTO.shape[:2]
SAM3_MISSING = import_error()
needs_sam3 = pytest.mark.skipif(
    SAM3_MISSING is not None, reason=f"Meta's sam3 cannot be imported here ({SAM3_MISSING}); see docs/segmentation.md"
)


def _bpe_or_skip() -> Path:
    try:
        return W.find_bpe()
    except CheckpointError as e:
        pytest.skip(str(e))


def _by_score(scores: np.ndarray, *arrays):
    order = np.argsort(-scores, kind="stable")
    return [a[order] for a in (scores, *arrays)]


def test_fixture_is_what_the_tests_assume():
    assert META["config"] == json.loads(Sam3Config.from_json(json.dumps(META["config"])).to_json())
    kept = {name: int(DATA[f"{name}.scores"].numel()) for name in CASES}
    assert kept == {name: c["kept"] for name, c in CASES.items()}
    q = META["config"]["num_queries"]
    assert all(0 < k < q for k in kept.values()), kept  # the threshold keeps some instances of each case, not all
    assert DATA["image"].shape == (3, META["config"]["resolution"], META["config"]["resolution"])


def test_preprocessing_reproduces_sam3_processor():
    ours = preprocess(PHOTO, META["config"]["resolution"])[0]
    ref = DATA["image"]
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    # uint8 resize then /255: equal up to float rounding (one uint8 step would be 2/255)
    assert (ours - ref).abs().max().item() < 1e-6


@pytest.mark.parametrize("case", ["exemplar", "combined"])
def test_exemplar_boxes_reproduce_sam3_normalisation(case):
    boxes, labels = boxes_to_model([tuple(b) for b in CASES[case]["boxes"]], W_, H)
    assert torch.allclose(boxes, DATA[f"{case}.boxes_normalised"], atol=1e-6)
    assert labels.tolist() == [bool(b[4]) for b in CASES[case]["boxes"]]


@pytest.mark.parametrize("case", ["text", "exemplar", "combined"])
def test_postprocessing_reproduces_sam3_processor(case):
    raw = {k.split(".raw.")[1]: v for k, v in DATA.items() if k.startswith(f"{case}.raw.")}
    scores, boxes, masks = postprocess(raw, W_, H, min_score=META["threshold"])
    ref_scores, ref_boxes, ref_masks = _by_score(
        DATA[f"{case}.scores"].numpy(), DATA[f"{case}.boxes"].numpy(), DATA[f"{case}.masks"].numpy()
    )
    assert len(scores) == CASES[case]["kept"] and np.all(np.diff(scores) <= 0)  # best first
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    np.testing.assert_allclose(boxes, ref_boxes, atol=1e-4)
    got = np.stack([m() for m in masks])
    assert got.shape == (len(scores), H, W_) and got.dtype == bool
    assert np.array_equal(got, ref_masks.astype(bool))
    assert 0 < got.mean() < 1  # real masks, not all-empty or all-full
    # max_objects keeps the best ones; a higher min_score drops the weakest
    top = postprocess(raw, W_, H, min_score=META["threshold"], max_objects=1)
    assert len(top[0]) == 1 and top[0][0] == scores[0]
    assert len(postprocess(raw, W_, H, min_score=float(scores[-1]))[0]) == len(scores) - 1


def test_concept_prompt_is_checked():
    with pytest.raises(ValueError, match="concept prompt is empty"):
        ConceptPrompt().validate(H, W_)
    with pytest.raises(ValueError, match="every exemplar box is negative"):
        ConceptPrompt(boxes=((1, 1, 5, 5, 0),)).validate(H, W_)
    with pytest.raises(ValueError, match="does not overlap the 160x120 photo"):
        ConceptPrompt(text="cup", boxes=((200, 1, 300, 5, 1),)).validate(H, W_)
    ConceptPrompt(text="cup", boxes=((1, 1, 5, 5, 0),)).validate(H, W_)  # text plus a negative exemplar is fine


# -- checkpoints --------------------------------------------------------------------------------------------------


def test_fixture_checkpoint_imports_as_sam3_with_its_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    folder = W.import_sam_checkpoint(FIXTURE / "sam3_tiny.safetensors", name="sam3_tiny")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "sam3" and manifest["model_type"] == "custom"
    assert manifest["config"] == META["config"]
    assert [m["name"] for m in W.list_sam(kind="sam3")] == ["sam3_tiny"] and W.list_sam(kind="sam2") == []
    assert W.verify("sam3_tiny") == []
    with pytest.raises(CheckpointError, match="is a sam3 checkpoint, not sam2"):
        W.load_sam2_state("sam3_tiny")


def test_official_layout_is_recognised_from_a_full_checkpoint(tmp_path):
    """A sam3.pt holds {"model": {"detector.*": ..., "tracker.*": ...}}: the detector is kept, its prefix removed;
    without a config in the file its sizes must be the official ones."""
    sd = {f"detector.{k}": v for k, v in load_file(str(FIXTURE / "sam3_tiny.safetensors")).items()}
    sd["tracker.maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    pt = tmp_path / "sam3.pt"
    torch.save({"model": sd}, pt)
    state = W.read_checkpoint(pt)
    assert "backbone.vision_backbone.trunk.patch_embed.proj.weight" in state
    assert not any(k.startswith(("detector.", "tracker.")) for k in state)
    # the tiny weights are not the official size, and a .pt carries no config: refused, naming the size
    with pytest.raises(CheckpointError, match="vit_dim is 32 in the weights but the official SAM 3 has 1024"):
        W.import_sam_checkpoint(pt, root=tmp_path / "seg")
    assert not (tmp_path / "seg" / "sam3").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "cannot be read as a safetensors file"),
        ("no_geometry", "no 'geometry_encoder.' entries; not a complete SAM 3 image checkpoint"),
        ("tracker_only", "only video-tracker entries"),
        ("wrong_config", "d_model is 32 in the weights but its sam3d_sam3_config metadata says 64"),
        ("pickle_code", "could run code"),
    ],
)
def test_wrong_sam3_checkpoints_are_refused_with_the_reason(tmp_path, damage, message):
    src = FIXTURE / "sam3_tiny.safetensors"
    sd = load_file(str(src))
    meta = {"sam3d_sam3_config": json.dumps(META["config"])}
    bad = tmp_path / "bad.safetensors"
    if damage == "truncate":
        data = src.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "no_geometry":
        save_file({k: v for k, v in sd.items() if not k.startswith("geometry_encoder.")}, str(bad), meta)
    elif damage == "tracker_only":
        bad = tmp_path / "bad.pt"
        torch.save({"model": {"tracker.maskmem_tpos_enc": torch.zeros(7, 1, 1, 64)}}, bad)
    elif damage == "wrong_config":
        save_file(sd, str(bad), {"sam3d_sam3_config": json.dumps({**META["config"], "d_model": 64})})
    elif damage == "pickle_code":
        bad = tmp_path / "bad.pt"
        torch.save({"model": {"detector.x": torch.zeros(1)}, "hook": os.getcwd}, bad)
    root = tmp_path / "seg"
    with pytest.raises(CheckpointError, match=message):
        W.import_sam_checkpoint(bad, name="sam3", root=root)
    assert not root.exists() or not any(root.iterdir())  # nothing half-imported


def test_imported_sam3_file_changed_on_disk_is_refused(tmp_path):
    folder = W.import_sam_checkpoint(FIXTURE / "sam3_tiny.safetensors", name="t", root=tmp_path)
    with open(folder / "sam.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="failed its integrity check"):
        W.load_sam3_state("t", tmp_path)


def test_bpe_vocabulary_is_checked_and_kept(tmp_path):
    import gzip

    fake = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    fake.write_bytes(b"not gzip")
    with pytest.raises(CheckpointError, match="is not a gzipped vocabulary"):
        W.import_sam_checkpoint(FIXTURE / "sam3_tiny.safetensors", root=tmp_path / "a", bpe=fake)
    with gzip.open(fake, "wt") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\ne r\n')
    folder = W.import_sam_checkpoint(FIXTURE / "sam3_tiny.safetensors", name="t", root=tmp_path / "b", bpe=fake)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"sam.safetensors", "bpe_simple_vocab_16e6.txt.gz"}
    assert W.find_bpe(folder) == (folder / "bpe_simple_vocab_16e6.txt.gz").resolve()
    cfg, state, bpe, digest = W.load_sam3_state("t", tmp_path / "b")
    assert cfg == Sam3Config.from_json(json.dumps(META["config"])) and cfg != OFFICIAL
    assert (
        bpe.parent == folder.resolve()
        and len(digest) == 64
        and len(state) == len(load_file(str(FIXTURE / "sam3_tiny.safetensors")))
    )


# -- no SAM 3 -----------------------------------------------------------------------------------------------------


def test_text_prompt_without_sam3_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    with pytest.raises(ConceptUnavailable, match="no SAM 3 weights are imported") as e:
        load_concept_segmenter()
    assert "facebook/sam3" in str(e.value) and "sam3d weights import-sam sam3.pt" in str(e.value)
    s = SegmentSession(backend="basic")
    with pytest.raises(ConceptUnavailable, match="request access to facebook/sam3"):
        s.segment_concept(FIXTURE / "photo.png", text="chair")
    with pytest.raises(ValueError, match="min_score 1.5"):  # bad options are named before anything loads
        s.segment_concept(FIXTURE / "photo.png", text="chair", min_score=1.5)
    with pytest.raises(ValueError, match="exemplar box \\[1, 2\\]"):
        s.segment_concept(FIXTURE / "photo.png", boxes=[[1, 2]])


# -- the back-end end to end (needs sam3) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sam3(tmp_path_factory):
    if SAM3_MISSING is not None:
        pytest.skip(f"Meta's sam3 cannot be imported here ({SAM3_MISSING})")
    bpe = _bpe_or_skip()
    root = tmp_path_factory.mktemp("seg")
    W.import_sam_checkpoint(FIXTURE / "sam3_tiny.safetensors", name="sam3_tiny", root=root, bpe=bpe)
    from sam3d_core.segment.sam3 import Sam3Segmenter

    return Sam3Segmenter.from_imported("sam3_tiny", root=root)


@needs_sam3
@pytest.mark.parametrize("case", ["text", "exemplar", "combined"])
def test_backend_reproduces_meta_end_to_end(tiny_sam3, case):
    c = CASES[case]
    tiny_sam3.set_image(PHOTO)
    prompt = ConceptPrompt(text=c["text"], boxes=tuple(tuple(b) for b in c["boxes"]))
    raw = tiny_sam3.raw_outputs(prompt)
    for k, v in raw.items():
        assert torch.allclose(v, DATA[f"{case}.raw.{k}"], atol=1e-5), k
    found = tiny_sam3.segment_concept(prompt, min_score=META["threshold"])
    ref_scores, ref_boxes, ref_masks = _by_score(
        DATA[f"{case}.scores"].numpy(), DATA[f"{case}.boxes"].numpy(), DATA[f"{case}.masks"].numpy()
    )
    assert [round(f.score, 5) for f in found] == [round(float(s), 5) for s in ref_scores]
    np.testing.assert_allclose([f.detected_box for f in found], ref_boxes, atol=1e-3)
    assert np.array_equal(np.stack([f.mask for f in found]), ref_masks.astype(bool))
    assert {f.score_kind for f in found} == {"presence x probability"}


@needs_sam3
def test_session_caches_the_photo_and_answers_each_prompt(tiny_sam3, tmp_path):
    s = SegmentSession(backend="basic", concept_segmenter=tiny_sam3)
    a = s.segment_concept(FIXTURE / "photo.png", text="chair", min_score=META["threshold"])
    b = s.segment_concept(FIXTURE / "photo.png", boxes=[[20, 30, 70, 90], [100, 10, 150, 60, 0]],
                          min_score=META["threshold"], max_objects=3)  # fmt: skip
    assert len(a) == CASES["text"]["kept"] and len(b) == 3
    assert len(s._concept_cache) == 1  # one encoded photo for both prompts


# -- the command line ---------------------------------------------------------------------------------------------


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from sam3d_core.cli.main import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_text_without_sam3_says_how_to_get_it_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    out = tmp_path / "masks"
    code, _, err = _cli(capsys, "segment", FIXTURE / "photo.png", "--text", "chair", "--out", out)
    assert code == 2 and err.count("\n") == 1 and "no SAM 3 weights are imported" in err
    assert "sam3d weights import-sam sam3.pt" in err and not out.exists()
    code, _, err = _cli(capsys, "scene", FIXTURE / "photo.png", "--text", "chair", "--out", out, "--model", "tiny")
    assert code == 2 and "no SAM 3 weights are imported" in err and not out.exists()  # before any model loaded


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--text", "chair", "--point", "5,5"], "give one of: --all, a click prompt"),
        (["--text", "chair", "--min-score", "1.5"], "argument --min-score: '1.5': expected a score 0 <= s < 1"),
        (["--text", "chair", "--max-objects", "0"], "--max-objects 0: expected at least 1"),
        (["--exemplar", "1,2,3"], "--exemplar '1,2,3': expected X0,Y0,X1,Y1"),
        (["--exemplar", "10,10,50,50,-"], "every exemplar box is negative"),
        (["--text", "chair", "--backend", "sam2"], "--backend sam2 answers clicks; --text / --exemplar need SAM 3"),
        (["--point", "5,5", "--max-objects", "2"], "--min-score and --max-objects go with --text"),
    ],
)
def test_cli_concept_options_are_checked(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    code, _, err = _cli(capsys, "segment", FIXTURE / "photo.png", *argv, "--out", tmp_path / "o")
    assert code == 2 and message in err, err


@needs_sam3
def test_cli_imports_sam3_and_writes_one_mask_per_instance(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    code, out, err = _cli(
        capsys,
        "weights",
        "import-sam",
        FIXTURE / "sam3_tiny.safetensors",
        "--name",
        "sam3_tiny",
        "--bpe",
        _bpe_or_skip(),
    )
    assert code == 0 and "SAM 3 text vocabulary" in out, err
    masks = tmp_path / "masks"
    code, out, err = _cli(
        capsys, "segment", FIXTURE / "photo.png", "--text", "red mug", "--exemplar=-10,40,60,130",
        "--min-score", META["threshold"], "--out", masks,
    )  # fmt: skip
    assert code == 0, err
    index = json.loads((masks / "objects.json").read_text())
    assert index["backend"].startswith("sam3") and index["concept"]["text"] == "red mug"
    ref_scores, _, ref_masks = _by_score(
        DATA["combined.scores"].numpy(), DATA["combined.boxes"].numpy(), DATA["combined.masks"].numpy()
    )
    assert [o["score"] for o in index["objects"]] == [round(float(s), 5) for s in ref_scores]
    for o, ref in zip(index["objects"], ref_masks, strict=True):
        assert np.array_equal(np.asarray(Image.open(masks / o["mask"])) > 127, ref.astype(bool))
    code, out, err = _cli(capsys, "segment", FIXTURE / "photo.png", "--text", "chair", "--max-objects", "1",
                          "--min-score", META["threshold"], "--out", masks)  # fmt: skip
    assert code == 0 and "found 1 instance(s) of 'chair'" in out  # beside the first results, nothing replaced
    assert (masks / "objects.json").is_file() and len(list(masks.glob("objects*.json"))) == 2


@needs_sam3
@pytest.mark.slow
def test_cli_scene_reconstructs_and_places_every_instance(tmp_path, monkeypatch, capsys):
    pytest.importorskip("trimesh")
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    W.import_sam_checkpoint(FIXTURE / "sam3_tiny.safetensors", name="sam3_tiny", bpe=_bpe_or_skip())
    out = tmp_path / "scene"
    code, _, err = _cli(
        capsys, "scene", FIXTURE / "photo.png", "--text", "chair", "--text", "red mug", "--max-objects", "1",
        "--min-score", META["threshold"], "--model", "tiny", "--device", "cpu", "--steps", "1",
        "--max-voxels", "64", "--texture-size", "64", "--faces", "200", "--depth-model", "none", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    scene = json.loads((out / "scene.json").read_text())
    assert [o["name"] for o in scene["objects"]] == ["chair_0", "red_mug_0"]
    assert all(len(o["pose"]["translation"]) == 3 for o in scene["objects"])


# -- on the GPU machine (marked gpu; the lead runs them there, see docs/segmentation.md) ----------------------------


@needs_sam3
@pytest.mark.gpu
def test_fixture_model_on_cuda_matches_meta_on_cpu(tiny_sam3):
    """The same tiny model on CUDA: Meta's CPU outputs within float tolerance (TF32 and kernel order differ)."""
    from sam3d_core.segment.sam3 import Sam3Segmenter

    gpu = Sam3Segmenter(tiny_sam3.model, tiny_sam3.cfg, "sam3 tiny (cuda)", "cuda")
    try:
        gpu.set_image(PHOTO)
        for case in ("text", "exemplar", "combined"):
            c = CASES[case]
            raw = gpu.raw_outputs(ConceptPrompt(text=c["text"], boxes=tuple(tuple(b) for b in c["boxes"])))
            for k, v in raw.items():
                assert torch.allclose(v.float().cpu(), DATA[f"{case}.raw.{k}"], atol=2e-3), (case, k)
    finally:
        tiny_sam3.model.cpu()
        tiny_sam3.device = torch.device("cpu")


@needs_sam3
@pytest.mark.gpu
@pytest.mark.slow
def test_official_size_runs_on_cuda():
    """The official sizes (840 M parameters, random weights: the work is the same) on the GPU, end to end."""
    from sam3d_core.segment.sam3 import Sam3Segmenter, build_model

    model = build_model(OFFICIAL, _bpe_or_skip())
    with torch.no_grad():  # sam3 leaves these two uninitialised (torch.empty)
        enc = model.backbone.language_backbone.encoder
        torch.nn.init.normal_(enc.positional_embedding, std=0.01)
        torch.nn.init.normal_(enc.text_projection, std=OFFICIAL.text_width**-0.5)
    seg = Sam3Segmenter(model, OFFICIAL, "sam3 (random)", "cuda")
    rgb = (np.random.default_rng(0).random((720, 1280, 3)) * 255).astype(np.uint8)
    seg.set_image(rgb)
    raw = seg.raw_outputs(ConceptPrompt(text="chair", boxes=((100, 100, 400, 500, 1),)))
    assert raw["pred_logits"].shape == (1, OFFICIAL.num_queries, 1)
    assert raw["pred_boxes"].shape == (1, OFFICIAL.num_queries, 4)
    assert raw["pred_masks"].shape[:2] == (1, OFFICIAL.num_queries) and raw["pred_masks"].shape[-1] == 288
    found = seg.segment_concept(ConceptPrompt(text="chair"), min_score=0.0, max_objects=5)
    assert len(found) == 5 and found[0].mask.shape == (720, 1280)
    assert all(torch.isfinite(v).all() for v in raw.values())


@needs_sam3
@pytest.mark.gpu
def test_importing_sam3_leaves_the_process_matmul_precision_alone():
    """sam3's package __init__ turns TF32 on for the whole process on Ampere+ GPUs; our import restores the flags
    (a fresh interpreter, so that sam3's import really runs here; on a CPU machine sam3 changes nothing)."""
    import subprocess
    import sys

    code = (
        "import torch; torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False\n"
        "from sam3d_core.segment.sam3 import import_error; assert import_error() is None\n"
        "print(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
