"""benchmarks/gpu_check.sh on the CPU (--dry-run: small models, sizes and counts), so that the one run on a GPU
machine cannot fail on the script itself; its verdicts on made-up numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check as check  # noqa: E402


def test_dry_run_covers_every_section(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "out"),
                           "--device", "cpu", "--dry-run", "--ckpt-dir", str(tmp_path / "ckpt")],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(check.SECTIONS) and not any("error" in s for s in sections.values())
    assert report["machine"]["device"] == "cpu" and report["machine"]["dry_run"]
    if GOLDEN.is_dir():  # the golden tests collected with the device in their environment
        cases = json.loads((GOLDEN / "cases.json").read_text())
        assert sections["golden"]["summary"].startswith(f"{3 * len(cases)} tests collected")
    assert set(sections["agreement"]["label_agreement_pct"]) == set(check.benchmark.CASES)
    assert all(v == 100.0 for v in sections["agreement"]["label_agreement_pct"].values())  # fp32 against itself
    assert sections["throughput"]["img_per_s_no_refine"] > 0 and sections["throughput"]["img_per_s_refine"] > 0
    assert sections["memory"]["status"].startswith("n/a") and sections["memory"]["repeats"] == 2
    frames = sections["frame_batch"]
    assert frames["frames"] == 3 and frames["label_agreement_pct"] == 100.0 and frames["status"] == "PASS"
    assert frames["frames_per_forward"] == 2  # the dry run: frames share forwards as on a GPU
    folder = sections["folder"]  # the command line sharing forwards two at a time, against one at a time
    assert folder["exit_codes"] == [0, 0] and folder["label_agreement_pct"] == 100.0 and folder["status"] == "PASS"
    assert sections["rates"]["frames_per_forward"] == {"64x96": 2}
    assert [(r["batch"], r["images"]) for r in sections["rates"]["rows"]] == [(1, 2), (2, 2), (3, 3)]
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert all(f"## {name}" in md for name in check.SECTIONS) and "| 64x96 | 3 | 3 |" in md


def test_frames_are_distinct_images_in_comfyui_layout():
    batch = check.frames((32, 48), 4)
    assert batch.shape == (4, 32, 48, 3) and 0 <= batch.min() and batch.max() <= 1
    assert all(not (batch[0] == batch[k]).all() for k in range(1, 4))


def _memory(**over) -> dict:
    return {"before_load_mb": 0.0, "loaded_mb": 400.0, "after_first_mb": 400.1, "after_repeats_max_mb": 400.1,
            "after_release_mb": 0.0, **over}


def test_memory_verdict():
    assert check.memory_verdict(_memory()) == "PASS"
    assert check.memory_verdict(_memory(after_repeats_max_mb=405.0)) == "FAIL"  # grew over the repeated calls
    assert check.memory_verdict(_memory(after_release_mb=30.0)) == "FAIL"  # something kept alive
    assert check.memory_verdict(_memory(loaded_mb=None)).startswith("n/a")


def test_frames_verdict():
    ok = {"label_agreement_pct": 100.0, "peak_growth_mb": 10.0, "device": "cuda"}
    assert check.frames_verdict(ok) == "PASS"
    assert check.frames_verdict({**ok, "label_agreement_pct": 99.95}) == "PASS"  # float16 under shared forwards
    assert check.frames_verdict({**ok, "label_agreement_pct": 99.8}) == "FAIL"
    assert check.frames_verdict({**ok, "peak_growth_mb": 500.0}) == "FAIL"  # memory grows with the batch
    assert check.frames_verdict({**ok, "peak_growth_mb": 500.0, "device": "cpu"}) == "PASS"  # resident memory


def test_target_and_golden_verdicts():
    row = {"size": [448, 448], "batch": 32, "img_per_s": 41.0, "peak_mb": 3000.0}
    assert check.target_verdict([row]).startswith("met")
    assert check.target_verdict([{**row, "img_per_s": 39.0}]).startswith("not met")
    assert check.target_verdict([{**row, "peak_mb": 5000.0}]).startswith("not met")
    assert check.target_verdict([{**row, "batch": 8}]).startswith("n/a")
    assert check.golden_verdict(0, "12 passed in 40.0s", dry=False) == "PASS"
    assert check.golden_verdict(0, "12 skipped in 1.0s", dry=False) == "FAIL"  # the fixtures were absent
    assert check.golden_verdict(1, "1 failed, 11 passed in 40.0s", dry=False) == "FAIL"
    assert check.golden_verdict(0, "12 tests collected in 0.1s", dry=True) == "PASS"


def test_bad_arguments_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="unknown nope; choose among golden"):
        check.main(["--out", str(tmp_path), "--sections", "golden,nope"])
    if not check.torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU is visible"):
            check.main(["--out", str(tmp_path), "--device", "cuda"])


def test_the_gpu_profile_times_each_variant_and_restores_the_code(tmp_path, capsys, monkeypatch):
    """benchmarks/gpu_profile.py on the CPU (its timings only): every variant timed, and the variant switches given
    back afterwards (the pack's own choices, not the last variant's)."""
    import gpu_profile
    from pack_import import core

    trident = core("pipeline").Trident
    monkeypatch.setattr(trident, "frames_per_forward", trident.frames_per_forward)  # (the CPU run forces 2)
    own = core("sam_affinity").heads_at_once
    assert gpu_profile.main(["--device", "cpu", "--ckpt-dir", str(tmp_path), "--frames", "3", "--size", "64",
                             "--reps", "1"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[time]")]
    assert [ln.split(":")[0][7:] for ln in lines] == list(gpu_profile.VARIANTS)
    assert all("3 frames of 64x64" in ln for ln in lines)
    assert core("sam_affinity").heads_at_once == own


def test_the_gpu_profile_puts_each_stage_in_a_profiler_range(small_trident, photo, monkeypatch):
    """The profile's stage table: each of STAGES runs inside a profiler range of its name."""
    import gpu_profile
    from pack_import import core

    pipeline = core("pipeline")
    for name in gpu_profile.STAGES:
        monkeypatch.setattr(pipeline, name, getattr(pipeline, name))  # (given back after the test)
    gpu_profile.stage_ranges()
    tr = pipeline.Trident(small_trident.clip, small_trident.dino, small_trident.sam)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        list(tr.segment_frames([photo[:64, :96], photo[10:74, :96]], "sky, person", per_forward=2))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert {f"stage {name}": counts.get(f"stage {name}") for name in gpu_profile.STAGES} == {
        "stage compute_frame_window_features": 1, "stage encode_frames": 1, "stage compute_feature_map": 2,
        "stage classify": 2}
