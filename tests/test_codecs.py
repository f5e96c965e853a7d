"""The node's processes never let pydicom pick GDCM (imaging/codecs.py). Checked in a child
process: removing a plugin is process-wide, and the render tests in this process rely on GDCM."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import JPEGExtended12Bit, RLELossless
assert "gdcm" in get_encoder(RLELossless).available_plugins, "GDCM is installed: the test means something"
from imaging.codecs import without_gdcm
without_gdcm()
import pydicom.pixels.decoders.base as d, pydicom.pixels.encoders.base as e
left = [uid for reg in (d._PIXEL_DATA_DECODERS, e._PIXEL_DATA_ENCODERS) for uid, (c, _) in reg.items()
        if "gdcm" in c.available_plugins]
assert left == [], left
assert get_encoder(RLELossless).available_plugins and get_decoder(JPEGExtended12Bit).available_plugins
print("ok")
"""


def test_without_gdcm_leaves_other_plugins() -> None:
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr

