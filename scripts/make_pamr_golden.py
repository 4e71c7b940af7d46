"""Write tests/data/pamr_reference.npz: the reference's own PAMR (github YuHengsss/Trident, pamr.py, imported from
an extracted copy, default /tmp/trident_ref) on a small real input, for tests/test_pamr.py.

The guide is a 40x56 crop of skimage's `coffee` CLIP-normalised as the reference's data preprocessor does; the
logits are smooth random cosines for 5 queries. PAMR runs 10 steps at the reference's default dilations, 8 and 16.

    python scripts/make_pamr_golden.py [--ref-dir /tmp/trident_ref]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ref-dir", default="/tmp/trident_ref")
    args = ap.parse_args()
    sys.path.insert(0, args.ref_dir)
    from pamr import PAMR  # the reference's module
    from skimage.data import coffee

    rgb = coffee()[180:220, 300:356].astype(np.float32)
    mean, std = np.array([122.771, 116.746, 104.094]), np.array([68.501, 66.632, 70.323])
    guide = torch.from_numpy(((rgb - mean) / std).astype(np.float32)).permute(2, 0, 1).contiguous()
    g = torch.Generator().manual_seed(14)
    coarse = torch.randn(1, 5, 5, 7, generator=g) * 0.1
    logits = F.interpolate(coarse, size=(40, 56), mode="bilinear", align_corners=False)[0]
    steps, dilations = 10, (8, 16)
    with torch.no_grad():
        out = PAMR(steps, list(dilations))(guide[None], logits[None])[0]
    path = Path(__file__).resolve().parents[1] / "tests" / "data" / "pamr_reference.npz"
    np.savez_compressed(path, guide=guide.numpy(), logits=logits.numpy(), refined=out.numpy(),
                        steps=np.array(steps), dilations=np.array(dilations))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
