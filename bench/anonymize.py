#!/usr/bin/env python3
"""De-identification benchmark: instances/s of the engine alone, on one core.

Run by hand (it is not a test)::

    .venv/bin/python bench/anonymize.py                   # 2,000 CT instances + pydicom's files
    .venv/bin/python bench/anonymize.py --count 500 --corpus /tmp/ct-corpus

Two corpora:

1. The CT corpus of ``bench/ingest.py`` (512x512, 16-bit, ~512 KiB each, studies of 100), made
   or reused with the same generator.
2. pydicom's bundled test files that parse (many transfer syntaxes, character sets, SR, US, RGB,
   multi-frame), each processed once per round.

For each instance, timed in one process (one core), under the default policy:

- ``engine``: ``Deidentifier.deidentify`` on a freshly parsed header (the parse is not timed);
- ``path``: what ingest does apart from storage: parse the header (pixels located, not read),
  de-identify, and write the de-identified object (pixels copied) to memory.

The last line is ``CT path: N instances/s per core (engine alone M/s); target 1000``.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pydicom import config  # noqa: E402
from pydicom.data.data_manager import DATA_ROOT  # noqa: E402

from imaging.deid import DeidentificationError, Deidentifier  # noqa: E402
from imaging.dicomio import MalformedInstance, read_received, write_instance  # noqa: E402
from imaging.policy import Policy  # noqa: E402
from imaging.pseudonym import KeyedHash  # noqa: E402

SCOPE = "partner:1"


def ct_files(args: argparse.Namespace, scratch: Path) -> list[Path]:
    import ingest as ingest_bench  # bench/ingest.py: the same generator and corpus

    root = Path(args.corpus) if args.corpus else scratch / "ct"
    files = sorted(root.rglob("*.dcm")) if root.exists() else []
    if len(files) < args.count:
        root.mkdir(parents=True, exist_ok=True)
        print(f"generating {args.count} CT instances in {root}", file=sys.stderr)
        ingest_bench.generate_corpus(root, args.count, 100, 1)
        files = sorted(root.rglob("*.dcm"))
    return files[: args.count]


def pydicom_files() -> list[Path]:
    out = []
    for p in sorted(Path(DATA_ROOT, "test_files").rglob("*.dcm")):
        try:
            inst = read_received(p)
        except MalformedInstance:
            continue
        if "SOPInstanceUID" in inst.ds and "SOPClassUID" in inst.ds:
            out.append(p)
    return out


def measure(files: list[Path], deid: Deidentifier, policy: Policy, rounds: int) -> tuple[float, float, int]:
    """(path instances/s, engine instances/s, failures), best of ``rounds``."""
    path_rates, engine_rates = [], []
    failures = 0
    for _ in range(rounds):
        engine_t = path_t = 0.0
        done = 0
        failures = 0
        for f in files:
            t0 = time.perf_counter()
            try:
                inst = read_received(f)
            except MalformedInstance:
                failures += 1
                continue
            t1 = time.perf_counter()
            try:
                deid.deidentify(inst.ds, SCOPE, policy, prefix="BEN")
            except DeidentificationError:
                failures += 1
                continue
            t2 = time.perf_counter()
            buf = io.BytesIO()
            write_instance(inst, buf)
            t3 = time.perf_counter()
            engine_t += t2 - t1
            path_t += t3 - t0
            done += 1
        path_rates.append(done / path_t)
        engine_rates.append(done / engine_t)
    return max(path_rates), max(engine_rates), failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000, help="CT instances (default 2000)")
    ap.add_argument("--corpus", help="folder of the CT corpus (made there when empty)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per corpus; the best is reported")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    config.settings.reading_validation_mode = config.IGNORE  # as the service runs (imx/ingest.py)
    deid = Deidentifier(KeyedHash(b"bench-key-0123456789abcdef012345"))
    policy = Policy.default()
    with tempfile.TemporaryDirectory(prefix="imx-bench-anon-") as scratch:
        ct = ct_files(args, Path(scratch))
        for f in ct[:50]:  # warm the page cache and the engine's caches
            inst = read_received(f)
            deid.deidentify(copy.deepcopy(inst.ds), SCOPE, policy, prefix="BEN")
        ct_path, ct_engine, ct_fail = measure(ct, deid, policy, args.rounds)
        pyd = pydicom_files()
        py_path, py_engine, py_fail = measure(pyd, deid, policy, args.rounds)
        sizes = [f.stat().st_size for f in ct]
    print(f"CT corpus: {len(ct)} instances, median {statistics.median(sizes) / 1024:.0f} KiB; failures {ct_fail}")
    print(f"pydicom corpus: {len(pyd)} files; refused {py_fail}")
    print(f"pydicom path: {py_path:.0f} instances/s per core (engine alone {py_engine:.0f}/s)")
    print(f"CT path: {ct_path:.0f} instances/s per core (engine alone {ct_engine:.0f}/s); target 1000")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
