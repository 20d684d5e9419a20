"""scripts/imagenet_fp32.py runs end to end on a few real ImageNet images (numbers checked for shape, not quality)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.zoo.test_torchvision_arch import IMAGENET, MBV2, needs_mbv2


@needs_mbv2
@pytest.mark.slow
def test_imagenet_fp32_script_writes_both_variants(tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "imagenet_fp32.py"), "--data", str(IMAGENET),
                          "--weights", str(MBV2), "--limit", "12", "--workers", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rep = json.loads(out.read_text())
    assert rep["images"] == 12 and set(rep["decode_seconds_by_workers"]) == {"0", "2"}
    assert [(r["model"], r["activation"]) for r in rep["rows"]] == [("mobilenet_v2", "ReLU6"),
                                                                     ("mobilenet_v2_relu", "ReLU")]
    assert sum(ln.startswith("| mobilenet_v2") for ln in res.stdout.splitlines()) == 2
