"""The command line writes the files it promises."""

from __future__ import annotations

import numpy as np
from PIL import Image

from trident_core.cli import main


def test_segment_command(small_ckpts, photo, tmp_path):
    img = tmp_path / "astronaut.png"
    Image.fromarray(photo[:200, :300]).save(img)
    npz = tmp_path / "r.npz"
    rc = main(["segment", str(img), "--classes", "sky, person; astronaut, flag", "--clip", str(small_ckpts["clip"]),
               "--dino", str(small_ckpts["dino"]), "--sam", str(small_ckpts["sam"]), "--refine", "--device", "cpu",
               "--out", str(tmp_path / "out"), "--save-npz", str(npz), "--no-download"])
    assert rc == 0
    out = tmp_path / "out"
    assert {p.name for p in (out / "masks").iterdir()} == {"000_sky.png", "001_person.png", "002_flag.png"}
    assert Image.open(out / "overlay.png").size == (300, 200)
    z = np.load(npz)
    assert z["logits"].shape == (4, 200, 300) and z["probs"].shape == (3, 200, 300)
    assert z["labels"].shape == (200, 300) and list(z["class_names"]) == ["sky", "person", "flag"]
    assert "labels_coarse" in z.files and "probs_coarse" in z.files
    masks = np.stack([np.array(Image.open(out / "masks" / f)) for f in sorted((out / "masks").iterdir())])
    assert ((masks > 0).sum(0) == (z["labels"] >= 0)).all()


def test_missing_model_without_download(tmp_path, capsys, photo):
    Image.fromarray(photo).save(tmp_path / "x.png")
    rc = main(["segment", str(tmp_path / "x.png"), "--classes", "a", "--clip", str(tmp_path / "nope.safetensors"),
               "--no-download", "--out", str(tmp_path)])
    assert rc == 2
    assert "nope.safetensors" in capsys.readouterr().err
