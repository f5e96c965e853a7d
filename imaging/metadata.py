"""The attributes the index keeps, taken from an already de-identified dataset."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset


def _str(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    try:
        v = ds.get(keyword)
    except Exception:
        return None
    if v is None or v == "":
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        v = "\\".join(str(x) for x in v)
    s = str(v).strip()
    return s[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        v = ds.get(keyword)
        return None if v is None or v == "" else int(v)
    except Exception:
        return None


def index_attributes(ds: Dataset) -> dict[str, Any]:
    """Study, series and instance level attributes for the index (PS3.4 C.6 query keys)."""
    return {
        "patient_sex": _str(ds, "PatientSex", 16),
        "patient_birth_date": _str(ds, "PatientBirthDate", 8),
        "study_date": _str(ds, "StudyDate", 8),
        "study_time": _str(ds, "StudyTime", 16),
        "accession": _str(ds, "AccessionNumber", 16),
        "study_id": _str(ds, "StudyID", 16),
        "study_description": _str(ds, "StudyDescription"),
        "modality": _str(ds, "Modality", 16),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _str(ds, "SeriesDescription"),
        "body_part": _str(ds, "BodyPartExamined", 16),
        "instance_number": _int(ds, "InstanceNumber"),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "frames": _int(ds, "NumberOfFrames") or (1 if "Rows" in ds else None),
    }
