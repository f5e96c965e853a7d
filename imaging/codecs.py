"""Which pixel codecs run where.

GDCM decodes a few syntaxes pylibjpeg cannot (12-bit JPEG Extended, some JPEG-LS), but on some
inputs it aborts the whole process from C++ instead of raising. It is therefore used only inside
the preview workers, which are separate, limited processes the supervisor replaces when one
dies (``imx/previews.py``, ``imaging/render.py``). The node's receivers and the HTTP app, which
must survive any object a partner sends, call :func:`without_gdcm` at start so that pydicom's
decoders and encoders never pick GDCM there: an object only GDCM could handle then fails with a
clear error rather than taking the process down.
"""

from __future__ import annotations

import pydicom.pixels.decoders.base as _decoders
import pydicom.pixels.encoders.base as _encoders


def without_gdcm() -> None:
    """Remove GDCM from every pydicom pixel decoder and encoder in this process."""
    for registry in (_decoders._PIXEL_DATA_DECODERS, _encoders._PIXEL_DATA_ENCODERS):
        for codec, _version in registry.values():
            if "gdcm" in codec._available or "gdcm" in codec._unavailable:
                codec.remove_plugin("gdcm")
