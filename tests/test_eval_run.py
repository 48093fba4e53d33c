"""`sam3d eval` end to end on a tiny dataset of primitives: the tiny model and the baselines on the CPU, both
result files, and bad inputs (each a one-line error with exit code 2, or a counted failure)."""

from __future__ import annotations

import json
import struct
from collections import Counter

import numpy as np
import pytest
from eval_samples import make_sample, write_dataset

from sam3d_core.cli.main import main
from sam3d_core.data.sample import ShardWriter

FAST = ["--points", "3000", "--emd-points", "128"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds") / "samples", count=6, seed=0, size=80)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_tiny_model_and_baselines_write_both_files(dataset, tmp_path, capsys):
    out = tmp_path / "results"
    rc, stdout, stderr = _run(
        capsys, dataset, "--out", out, "--model", "tiny,box,ellipsoid", "--limit", "2", "--steps", "1", *FAST
    )
    assert rc == 0, stderr
    assert stdout.split() == [str(out / "results.json"), str(out / "results.md")]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]  # no temporary left over
    res = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["tiny", "box", "ellipsoid"]
    assert res["dataset"]["samples"] == 6 and res["dataset"]["evaluated"] == 2
    for m in res["models"]:
        assert [s["sample_id"] for s in m["samples"]] == ["box-000", "ellipsoid-001"]
        assert [s["status"] for s in m["samples"]] == ["ok", "ok"], [s.get("error") for s in m["samples"]]
        overall = m["aggregates"]["overall"]
        assert overall["n"] == 2 and overall["failed"] == 0
        assert overall["f1"] == pytest.approx(np.mean([s["metrics"]["f1"] for s in m["samples"]]))
        assert 0.0 <= overall["viou"] <= 1.0 and overall["add_s"] > 0.0
    tiny, box = res["models"][0], res["models"][1]
    assert tiny["samples"][0]["points"]["prediction_points"] == "voxels"
    assert tiny["samples"][0]["prediction"]["pointmap"] == "user"  # the sample's point map reached the model
    assert box["samples"][0]["points"]["prediction_points"] == "mesh"
    assert tiny["weights"].startswith("random:") and box["weights"] == "none"
    md = (out / "results.md").read_text()
    box_row = next(line for line in md.splitlines() if line.startswith("| box | 2 | 0 |"))
    assert f"{box['aggregates']['overall']['viou']:.4f}" in box_row
    assert f"| tiny | ellipsoid | 1 | 0 | {tiny['samples'][1]['metrics']['f1']:.4f} |" in md
    assert "tiny       [" in stderr and "2/2" in stderr  # the progress bar


def test_tables_per_group_and_occlusion_level(dataset, tmp_path, capsys):
    out = tmp_path / "groups"
    rc, _, stderr = _run(capsys, dataset, "--out", out, "--model", "box,oracle", *FAST)
    assert rc == 0, stderr
    res = json.loads((out / "results.json").read_text())
    for m in res["models"]:
        agg = m["aggregates"]
        assert agg["overall"]["n"] == 6
        assert {g: a["n"] for g, a in agg["by_group"].items()} == {"box": 2, "cylinder": 2, "ellipsoid": 2}
        hidden = {s["sample_id"]: s["occlusion"] for s in m["samples"]}
        assert [k for k, v in hidden.items() if v > 0.05] == ["box-003", "ellipsoid-004", "cylinder-005"]
        # the render-paste benchmark's bins (data/benchmark.py), written out here
        levels = Counter(
            "none (<5%)" if v < 0.05 else "low (5%-30%)" if v < 0.3 else "medium (30%-60%)" if v < 0.6 else "high"
            for v in hidden.values()
        )
        assert {lv: a["n"] for lv, a in agg["by_occlusion"].items()} == dict(levels)
        assert levels["none (<5%)"] == 3 and levels["medium (30%-60%)"] >= 1
        medium = [s["metrics"]["iou3d"] for s in m["samples"] if s["occlusion_level"] == "medium (30%-60%)"]
        assert agg["by_occlusion"]["medium (30%-60%)"]["iou3d"] == pytest.approx(np.mean(medium))
    oracle = res["models"][1]["aggregates"]["overall"]
    assert oracle["rot_err"] == 0.0 and oracle["add_s_01"] == 1.0 and oracle["iou3d"] > 0.9
    md = (out / "results.md").read_text()
    for section in ("## Overall", "## By object group", "## By occlusion level"):
        assert section in md
    assert "| oracle | cylinder | 2 | 0 |" in md and "| box | none (<5%) | 3 | 0 |" in md


@pytest.mark.slow
def test_eval_stage2_scores_the_mesh(dataset, tmp_path, capsys):
    out = tmp_path / "s2"
    rc, _, stderr = _run(
        capsys, dataset, "--out", out, "--model", "tiny", "--stage2", "--limit", "1", "--steps", "1",
        "--max-voxels", "64", *FAST,
    )  # fmt: skip
    assert rc == 0, stderr
    sample = json.loads((out / "results.json").read_text())["models"][0]["samples"][0]
    assert sample["status"] == "ok", sample.get("error")
    assert sample["points"]["prediction_points"] == "mesh" and sample["prediction"]["mesh_faces"] > 0
    assert sample["prediction"]["voxels"] <= 64


def test_a_bad_sample_is_counted_and_the_run_goes_on(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ds = tmp_path / "ds"
    behind = make_sample(1, "box", rng)
    behind.translation = behind.translation * [1, 1, -1]  # centre behind the camera: the box cannot be fitted
    with ShardWriter(ds, samples_per_shard=8) as w:
        for s in (make_sample(0, "box", rng), behind, make_sample(2, "cylinder", rng)):
            w.add(s)
    _corrupt_photo(ds / "shard-00000.safetensors", index=2)
    rc, _, stderr = _run(capsys, ds, "--out", tmp_path / "out", "--model", "box,oracle", *FAST)
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    box, oracle = res["models"]
    assert [s["status"] for s in box["samples"]] == ["ok", "failed", "failed"]
    assert box["samples"][1]["error"].startswith("predict: ValueError: depth: got -")
    assert box["samples"][2]["error"].startswith("read: ")  # the photo PNG is garbage
    assert [s["status"] for s in oracle["samples"]] == ["ok", "ok", "failed"]
    assert box["failed"] == 2 and box["aggregates"]["overall"] | {} == box["aggregates"]["overall"]
    assert box["aggregates"]["overall"]["n"] == 1 and box["aggregates"]["overall"]["failed"] == 2
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Failures (3)" in md and "`box` / `box-001`: predict: ValueError: depth" in md
    assert "box: sample 2 failed: predict: ValueError: depth" in stderr
    assert "3 sample runs failed" in stderr


def _corrupt_photo(shard, index: int) -> None:
    """Overwrite the PNG bytes of sample `index`'s photo in place (same size: the shard still opens)."""
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start, end = header[f"{index}/photo_png"]["data_offsets"]
    data[8 + n + start : 8 + n + end] = b"\x00" * (end - start)
    shard.write_bytes(bytes(data))


def test_bad_inputs_get_one_line_and_exit_code_2(dataset, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    cases = [
        ([tmp_path / "nowhere", "--out", tmp_path / "o1"], "is not a folder"),
        ([tmp_path, "--out", tmp_path / "o2", "--model", "box"], "has no dataset.json"),
        ([dataset, "--out", busy, "--model", "box"], "already holds files"),
        ([dataset, "--out", busy / "mine.txt", "--model", "box"], "is a file"),
        ([dataset, "--out", tmp_path / "o3", "--model", "no-such-model"], "no imported model 'no-such-model'"),
        ([dataset, "--out", tmp_path / "o4", "--model", "box,box"], "listed twice"),
        ([dataset, "--out", tmp_path / "o5", "--model", "box,"], "names separated by commas"),
        ([dataset, "--out", tmp_path / "o6", "--model", "box", "--limit", "0"], "limit=0"),
        ([dataset, "--out", tmp_path / "o7", "--model", "box", "--points", "10"], "points=10"),
        ([dataset, "--out", tmp_path / "o8", "--model", "box", "--workers", "0"], "--workers 0: expected at least 1"),
        ([dataset, "--out", tmp_path / "o9", "--model", "box", "--cfg-strength", "-1"], "cfg_strength=-1.0"),
    ]
    for argv, message in cases:
        rc, _, stderr = _run(capsys, *argv)
        assert rc == 2, (argv, stderr)
        assert stderr.startswith("sam3d: error: ") and message in stderr, stderr
        assert stderr.count("\n") == 1, stderr  # one line, no traceback
    assert (busy / "mine.txt").read_text() == "keep me"
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 10))  # refused before the folder was made


def test_an_empty_dataset_is_refused(tmp_path, capsys):
    with ShardWriter(tmp_path / "empty"):
        pass
    rc, _, stderr = _run(capsys, tmp_path / "empty", "--out", tmp_path / "o", "--model", "box")
    assert rc == 2 and "no samples in" in stderr


def _without_timings(res: dict) -> list:
    return [
        (m["name"], m["failed"], m["aggregates"], [{k: v for k, v in r.items() if k != "seconds"} for r in rows])
        for m in res["models"]
        for rows in [m["samples"]]
    ]


def test_scoring_in_worker_processes_gives_the_same_results(tmp_path, capsys):
    rng = np.random.default_rng(3)
    flat = make_sample(4, "cylinder", rng, size=64)
    flat.surface_points = np.tile(flat.surface_points[:1], (50, 1))  # every target point the same: scoring fails
    with ShardWriter(tmp_path / "ds", samples_per_shard=3) as w:
        for i, kind in enumerate(["box", "ellipsoid", "cylinder", "box"]):
            w.add(make_sample(i, kind, rng, size=64, occluded=i == 3))
        w.add(flat)
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        argv = [tmp_path / "ds", "--out", out, "--model", "box,oracle", "--workers", workers, *FAST]
        rc, _, stderr = _run(capsys, *argv)
        assert rc == 0, stderr
        assert f"scored in {workers} process(es)" in stderr
        results[workers] = json.loads((out / "results.json").read_text())
        assert results[workers]["run"]["workers"] == workers
        assert f"Scored in {workers} process" in (out / "results.md").read_text()
    assert _without_timings(results[1]) == _without_timings(results[2])  # every metric, every row, in order
    for m in results[2]["models"]:
        assert [r["index"] for r in m["samples"]] == [0, 1, 2, 3, 4]
        assert [r["status"] for r in m["samples"]] == ["ok"] * 4 + ["failed"]
        assert (
            m["samples"][4]["error"] == "score: ValueError: points: all points coincide; a shape needs an extent "
            "to be normalised"
        )
        assert all(r["seconds"]["score"] >= 0 for r in m["samples"])
    box = results[2]["models"][0]
    assert box["aggregates"]["overall"]["n"] == 4 and box["samples"][0]["metrics"]["iou3d"] > 0.3


def test_default_workers_are_the_usable_cores_minus_one(monkeypatch):
    from sam3d_core.evaluation import run

    for cores, want in ((1, 1), (2, 1), (16, 15)):
        monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert run.default_workers() == want


def test_the_guidance_strength_reaches_the_sampler_and_is_recorded(dataset, tmp_path, capsys, monkeypatch):
    from sam3d_core.pipeline.stage1 import Stage1Pipeline

    seen = []
    real = Stage1Pipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("cfg_strength"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Stage1Pipeline, "__call__", spy)
    for flag, expect in (([], None), (["--cfg-strength", "0"], 0.0)):
        out = tmp_path / f"cfg{len(flag)}"
        argv = [dataset, "--out", out, "--model", "tiny", "--limit", "1", "--steps", "1", *FAST, *flag]
        rc, _, stderr = _run(capsys, *argv)
        assert rc == 0, stderr
        assert json.loads((out / "results.json").read_text())["settings"]["cfg_strength"] == expect
        assert seen.pop() == expect and not seen


def test_the_model_is_given_the_samples_point_map(tmp_path, capsys):
    """The committed render-paste excerpt: its point map (NaN off the object and its occluders) reaches stage 1,
    whose normalisation is the median of the masked points; --no-pointmap gives the plane at unit distance."""
    from sam3d_core.data.heldout import default_manifest
    from sam3d_core.data.sample import SampleDataset

    bench = default_manifest().parent / "samples"
    sample = SampleDataset(bench)[0]
    masked = sample.pointmap[sample.mask]  # [N, 3], all finite: every visible pixel has a surface
    assert np.isfinite(masked).all() and np.isnan(sample.pointmap).any()
    shifts = {}
    for flag in ([], ["--no-pointmap"]):
        out = tmp_path / ("plane" if flag else "pointmap")
        argv = [bench, "--out", out, "--model", "tiny", "--limit", "1", "--steps", "1", "--workers", "1", *FAST]
        rc, _, stderr = _run(capsys, *argv, *flag)
        assert rc == 0, stderr
        row = json.loads((out / "results.json").read_text())["models"][0]["samples"][0]
        assert row["status"] == "ok", row.get("error")
        shifts["plane" if flag else "pointmap"] = (row["prediction"]["pointmap"], row["prediction"]["pointmap_shift"])
    source, shift = shifts["pointmap"]
    assert source == "user"
    assert shift == pytest.approx(np.median(masked, axis=0), abs=2e-3)  # metres, the object's own depth
    assert shift[2] == pytest.approx(float(np.median(masked[:, 2])), abs=2e-3) and abs(shift[2] - 1.0) > 0.05
    source, shift = shifts["plane"]
    assert source == "fallback plane" and shift[2] == pytest.approx(1.0, abs=1e-6)
