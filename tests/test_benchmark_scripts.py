"""The measurement scripts' own logic (benchmarks/): log parsing and target verdicts on made-up numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


many = _load("many_images")


def _run(n: int, wall: float, peak: float, per_image: float, cache: str = "warm", text: float | None = None) -> dict:
    return {"images": n, "text_cache": cache, "wall_s": wall, "peak_mb": peak, "per_image_s": per_image,
            **({"text_s": text} if text is not None else {})}


def _measurements(**over) -> dict:
    m = {"names": 28, "ours": {"1_cold": _run(1, 30.0, 1500, 10.0, "cold", 12.0), "1_warm": _run(1, 20.0, 1500, 10.0),
                               "2_warm": _run(2, 30.0, 1600, 10.0), "16_warm": _run(16, 162.0, 1650, 10.0)},
         "reference": {"predict_s": 60.0, "whole_s": 200.0}}
    m.update(over)
    return m


def _status(rows: list[dict]) -> list[str]:
    return [r["status"] for r in rows]


def test_targets_pass_and_fail_on_made_up_numbers():
    rows = many.targets(_measurements())
    assert _status(rows) == ["PASS"] * 5 + ["(PASS)"]
    assert rows[0]["limit"] == 16 * 10.0 + 3 and rows[1]["limit"] == 15.0 and rows[4]["limit"] == 60.0
    assert rows[2]["value"] == 50

    m = _measurements()
    m["ours"]["16_warm"] |= {"wall_s": 170.0, "peak_mb": 2100, "per_image_s": 16.0}
    m["ours"]["1_cold"]["wall_s"] = 61.0
    rows = many.targets(m)
    assert _status(rows) == ["PASS", "FAIL", "FAIL", "FAIL", "FAIL", "(PASS)"]
    m["ours"]["16_warm"]["per_image_s"] = 10.0
    assert many.targets(m)[0]["status"] == "FAIL"  # 170 s > 16 x 10 s + 3 s


def test_targets_without_the_reference_are_not_applicable():
    rows = many.targets(_measurements(reference=None))
    assert _status(rows) == ["PASS", "n/a", "PASS", "PASS", "n/a", "(n/a)"]
    many.print_table(rows)


def test_bf16_timed_rounds_keep_the_fastest_times_and_the_highest_peak():
    bf16 = _load("cpu_bf16")
    rounds = [{"per_image_s": 5.4, "wall_s": 19.0, "peak_mb": 1300},
              {"per_image_s": 4.6, "wall_s": 19.5, "peak_mb": 1350},
              {"wall_s": 18.2, "peak_mb": 1320}]  # (a round whose progress lines were not all read)
    assert bf16.fastest(rounds) == {"per_image_s": 4.6, "wall_s": 18.2, "peak_mb": 1350, "rounds": 3}
    assert bf16.fastest([{}])["per_image_s"] is None


def test_cli_log_parsing():
    lines = [(3.0, "models loaded in 2.5s on cpu (CLIP ViT-B-16, DINO vitb16, SAM vit_b)"),
             (9.0, "[segment] [############            ] 1/2  0.20 img/s  ETA 00:00:05  a.png"),
             (19.5, "[segment] [########################] 2/2  0.12 img/s  ETA 00:00:00  b.png"),
             (19.6, "2 segmented in 16.0s, 0 already complete, 0 unreadable (skipped) -> out")]
    assert many.parse_cli(lines, 2) == {"load_s": 2.5, "start_s": 0.5, "loop_s": 16.0, "segmented": 2,
                                        "last_line_at_s": 19.6, "per_image_s": 10.5, "first_image_with_text_s": 6.0}
    single = [(3.0, "models loaded in 2.5s on cpu"), (7.0, "[   0.0s] text"), (8.0, "[   1.0s] windows"),
              (15.0, "1 segmented in 8.0s, 0 already complete, 0 unreadable (skipped) -> out")]
    assert many.parse_cli(single, 1) == {"load_s": 2.5, "start_s": 0.5, "loop_s": 8.0, "segmented": 1,
                                         "last_line_at_s": 15.0, "text_s": 4.0, "per_image_s": 8.0}


def test_images_are_distinct_and_deterministic(tmp_path):
    a = many.make_images(tmp_path / "a", 3, 32)
    b = many.make_images(tmp_path / "b", 3, 32)
    from PIL import Image

    arrays = [np.asarray(Image.open(p)) for p in a]
    assert all(x.shape == (32, 32, 3) for x in arrays)
    assert all(np.array_equal(x, np.asarray(Image.open(p))) for x, p in zip(arrays, b))
    assert not np.array_equal(arrays[0], arrays[1])


def test_class_file_is_voc21_background_plus_foreground(tmp_path):
    path = tmp_path / "classes.txt"
    assert many.write_class_file(path, "person, rocket") == 28
    lines = path.read_text().split("\n")
    assert len(lines) == 3 and lines[0].startswith("sky; wall") and lines[1:] == ["person", "rocket"]


def test_reference_predict_wrapper_repeats_and_times():
    rp = _load("reference_predict")

    class Model:
        calls = 0

        def predict(self, x):
            Model.calls += 1
            return x + Model.calls

    times = {"warmup_s": [], "predict_s": []}
    rp.wrap_predict(Model, 1, 3, times)
    assert Model().predict(10) == 14 and Model.calls == 4
    assert len(times["warmup_s"]) == 1 and len(times["predict_s"]) == 3


def test_comfyui_frames_verdict():
    frames = _load("comfyui_frames")
    results = [{"frames": 2, "peak_rise_mb": 1400, "rise_after_mb": 1300},
               {"frames": 32, "peak_rise_mb": 1540, "rise_after_mb": 1460}]
    v = frames.compare(results, 150)
    assert v["status"] == "PASS" and v["extra_peak_rise_mb"] == 140 and v["extra_rise_after_mb"] == 160
    results[1]["peak_rise_mb"] = 1551
    assert frames.compare(results, 150)["status"] == "FAIL"


def test_bf16_targets_on_made_up_numbers():
    bf16 = _load("cpu_bf16")

    def run(per_image: float, wall: float, peak: float) -> dict:
        return {"per_image_s": per_image, "wall_s": wall, "peak_mb": peak}

    m = {"images": 3, "runs": {"first_fp32": run(9.0, 20.0, 1400), "first_bf16": run(5.0, 19.0, 1450),
                               "voc21_fp32": run(11.0, 60.0, 1700), "voc21_bf16": run(7.0, 50.0, 1600),
                               "voc21_fp32_timed": run(9.0, 30.0, 1500), "voc21_bf16_timed": run(4.5, 17.0, 1300)},
         "agreement": {"voc21": {"labels_equal_pct": 99.9, "max_diff_probs": 0.004}}}
    rows = bf16.targets(m)
    # first run +50 MB; per image 9 / 4.5 = 2x; whole process 30 / 17 = 1.76x < 1.8x; memory -200 MB without npz,
    # -100 MB with
    assert _status(rows) == ["FAIL", "PASS", "FAIL", "PASS", "PASS", "PASS", "PASS"]
    assert rows[0]["value"] == 50 and rows[1]["value"] == 2.0 and rows[3]["value"] == -200
    assert rows[6]["value"] == -100
    m["agreement"]["voc21"] = {"labels_equal_pct": 99.4, "max_diff_probs": 0.02}
    m["runs"]["voc21_bf16"]["peak_mb"] = 1800
    assert _status(bf16.targets(m))[4:] == ["FAIL", "FAIL", "FAIL"]
    del m["runs"]["voc21_bf16_timed"]["per_image_s"]
    assert bf16.targets(m)[1]["status"] == "n/a"
    many.print_table(rows)
