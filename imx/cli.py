"""The ``imx`` command.

    imx serve                                   run the node, the HTTP app and the spool drainer
    imx partner add NAME --ae AE [--host H]... [--dest HOST:PORT]
                                                register a partner hospital (works while serving)
    imx partner dest NAME HOST:PORT|--none      where C-MOVE sends to the partner's AE title
    imx partner list | remove NAME
    imx partner policy NAME [--set FILE | --default | --show]
                                                a partner's de-identification policy
    imx quarantine list | release SOP_UID | mask SOP_UID [--region X,Y,W,H]...
                                                objects held back for burned-in annotation
    imx send HOST PORT PATH... --aec AE --aet AE send DICOM files, folders and zips to a node
    imx anonymize SRC DST [--partner NAME] [--policy FILE]
                                                de-identify a folder, zip or DICOMDIR offline
    imx check [--repair]                        verify that index and object store agree
    imx settings                                every IMX_ setting with its default
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imx.config import Settings


def _settings() -> Settings:
    try:
        return Settings.load()
    except Exception as e:  # pydantic's message names the variable and what is wrong
        print(f"imx: invalid setting: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _index(settings: Settings):  # type: ignore[no-untyped-def]
    from imx.config import ensure_layout
    from storage.index import Index

    ensure_layout(settings)
    index = Index(settings.effective_database_url)
    index.migrate()
    return index


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings()
    metrics_dir = settings.run_dir / "metrics"
    if metrics_dir.exists():
        for p in metrics_dir.iterdir():
            p.unlink(missing_ok=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # before prometheus_client is imported
    from imx.serve import serve

    return serve(settings)


def _valid_ae(value: str) -> str:
    v = value.strip()
    if not v or len(v) > 16 or "\\" in v or not all(32 <= ord(c) < 127 for c in v):
        raise argparse.ArgumentTypeError("an AE title is 1 to 16 ASCII characters, no backslash")
    return v


def _destination(value: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 address in brackets: [::1]:104) of a partner's storage SCP."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError("a destination is HOST:PORT, e.g. pacs.city-hospital.example:104")
    return host, int(port)


def cmd_partner_add(args: argparse.Namespace) -> int:
    from storage.index import PartnerExists

    index = _index(_settings())
    dest_host, dest_port = args.dest if args.dest else (None, None)
    try:
        p = index.add_partner(args.name, args.ae, args.host or [], dest_host, dest_port)
    except PartnerExists as e:
        print(f"imx: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"imx: invalid --host or --dest: {e}", file=sys.stderr)
        return 2
    hosts = ", ".join(p.host_list) or "any host"
    dest = f"; C-MOVE destination {p.dest_host}:{p.dest_port}" if p.dest_host else ""
    print(f"partner {p.name} added: calling AE title {p.ae_title}, from {hosts}{dest}")
    return 0


def cmd_partner_dest(args: argparse.Namespace) -> int:
    index = _index(_settings())
    host, port = (None, None) if args.none else args.destination
    try:
        found = index.set_partner_destination(args.name, host, port)
    except ValueError as e:
        print(f"imx: invalid destination: {e}", file=sys.stderr)
        return 2
    if not found:
        print(f"imx: no partner named {args.name!r}", file=sys.stderr)
        return 1
    if host is None:
        print(f"partner {args.name}: no longer a C-MOVE destination")
    else:
        print(f"partner {args.name}: C-MOVE to its AE title sends to {host}:{port}")
    return 0


def cmd_partner_list(args: argparse.Namespace) -> int:
    index = _index(_settings())
    partners = index.partners()
    if not partners:
        print("no partners registered")
        return 0
    w = max(len(p.name) for p in partners)
    print(f"{'NAME':<{w}}  {'AE TITLE':<16}  {'C-MOVE DESTINATION':<26}  {'POLICY':<8}  HOSTS")
    for p in partners:
        dest = f"{p.dest_host}:{p.dest_port}" if p.dest_host else "-"
        policy = "own" if p.policy else "default"
        state = "" if p.active else "  (removed: cannot send)"
        print(f"{p.name:<{w}}  {p.ae_title:<16}  {dest:<26}  {policy:<8}  {', '.join(p.host_list) or 'any'}{state}")
    return 0


def cmd_partner_remove(args: argparse.Namespace) -> int:
    index = _index(_settings())
    what = index.remove_partner(args.name)
    if what is None:
        print(f"imx: no partner named {args.name!r}", file=sys.stderr)
        return 1
    if what == "deactivated":
        print(f"partner {args.name} removed: it can no longer send; its studies stay in the archive")
    else:
        print(f"partner {args.name} removed")
    return 0


def cmd_partner_policy(args: argparse.Namespace) -> int:
    from imaging.policy import Policy, PolicyError

    settings = _settings()
    index = _index(settings)
    p = index.partner_by_name(args.name)
    if p is None:
        print(f"imx: no partner named {args.name!r}", file=sys.stderr)
        return 1
    if args.set:
        try:
            policy = Policy.load(Path(args.set))
        except PolicyError as e:
            print(f"imx: {e}", file=sys.stderr)
            return 2
        index.set_partner_policy(args.name, policy.to_json())
        print(f"partner {args.name}: policy set")
    elif args.default:
        index.set_partner_policy(args.name, None)
        print(f"partner {args.name}: the operator's default policy applies")
    p = index.partner_by_name(args.name)
    own = getattr(p, "policy", None)
    policy = Policy.from_json(own) if own else (Policy.load(settings.policy_file) if settings.policy_file else Policy.default())
    print(f"{'own' if own else 'default'} policy: options {', '.join(policy.to_mapping()['options']) or '(Basic Profile only)'}; burned-in: {policy.burned_in.value}")
    return 0


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    index = _index(_settings())
    rows = index.quarantined(limit=args.limit)
    if not rows:
        print("nothing is quarantined")
        return 0
    for r in rows:
        print(f"{r['sop_uid']}  partner {r['partner']}  study {r['study_uid']}  {r['reason']}")
    return 0


def cmd_quarantine_release(args: argparse.Namespace) -> int:
    index = _index(_settings())
    if not index.release(args.sop_uid):
        print(f"imx: no quarantined instance {args.sop_uid}", file=sys.stderr)
        return 1
    print(f"released {args.sop_uid}: specialists can see it now")
    return 0


def _region(value: str):  # type: ignore[no-untyped-def]
    from imaging.burnin import Region

    try:
        x, y, w, h = (int(v) for v in value.split(","))
        return Region(x, y, w, h)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError("a region is X,Y,WIDTH,HEIGHT in pixels, e.g. 0,0,640,60") from None


def cmd_quarantine_mask(args: argparse.Namespace) -> int:
    from imx.config import ensure_layout
    from imx.ingest import Archive

    settings = _settings()
    ensure_layout(settings)
    archive = Archive(settings)
    try:
        archive.index.migrate()
        print(archive.mask_quarantined(args.sop_uid, tuple(args.region) if args.region else None))
        return 0
    except ValueError as e:
        print(f"imx: {e}", file=sys.stderr)
        return 1
    finally:
        archive.close()


def cmd_send(args: argparse.Namespace) -> int:
    from dicom_node.send import send

    summary = send(
        args.host,
        args.port,
        [Path(p) for p in args.paths],
        aec=args.aec,
        aet=args.aet,
        state_path=Path(args.state) if args.state else None,
        retries=args.retries,
        progress=not args.no_progress,
    )
    return 0 if not summary.failed and (summary.sent or summary.already) else 1


def cmd_anonymize(args: argparse.Namespace) -> int:
    from imx.anonymize import anonymize

    return anonymize(
        _settings(),
        Path(args.src),
        Path(args.dst),
        args.partner,
        Path(args.policy) if args.policy else None,
        progress=not args.no_progress,
    )


def cmd_check(args: argparse.Namespace) -> int:
    from imx.check import check

    settings = _settings()
    return check(settings, repair=args.repair)


def cmd_settings(args: argparse.Namespace) -> int:
    for name, default, desc in Settings.describe(Settings.model_construct()):
        print(f"{name:<28} {default:<22} {desc}")
    return 0


def _viewport(value: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("a size is WIDTHxHEIGHT in pixels, e.g. 256x256") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError("a size is WIDTHxHEIGHT, both at least 1")
    return w, h


def cmd_render(args: argparse.Namespace) -> int:
    """Render one frame of a DICOM file to PNG, JPEG or WebP (PS3.4 Annex N grayscale pipeline)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from imaging.render import RenderError, Window, render

    fmt = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(Path(args.out).suffix.lower())
    if fmt is None:
        print("imx: the output file must end in .png, .jpg, .jpeg or .webp", file=sys.stderr)
        return 1
    window = Window(args.window[0], args.window[1]) if args.window else None
    try:
        ds = dcmread(args.src)
        data = render(ds, args.frame, window=window, size=args.size, fmt=fmt, quality=args.quality)
    except FileNotFoundError:
        print(f"imx: no such file: {args.src}", file=sys.stderr)
        return 1
    except (InvalidDicomError, RenderError) as e:
        print(f"imx: cannot render {args.src}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a file pydicom cannot parse
        print(f"imx: cannot render {args.src}: not a readable DICOM file ({type(e).__name__})", file=sys.stderr)
        return 1
    Path(args.out).write_bytes(data)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imx", description="imaging-exchange: cross-border DICOM exchange")
    sub = ap.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("serve", help="run the DICOM node and the HTTP app")
    sp.set_defaults(func=cmd_serve)

    pp = sub.add_parser("partner", help="register, list and remove partner hospitals")
    psub = pp.add_subparsers(dest="partner_command", required=True)
    pa = psub.add_parser("add", help="register a partner hospital")
    pa.add_argument("name", help="short name, e.g. OSH-CITY-HOSPITAL")
    pa.add_argument("--ae", required=True, type=_valid_ae, help="the calling AE title the hospital sends with")
    pa.add_argument("--host", action="append", help="address or CIDR it may send from (repeatable); default any")
    pa.add_argument("--dest", type=_destination, metavar="HOST:PORT", help="its storage SCP: where C-MOVE to its AE title sends")
    pa.set_defaults(func=cmd_partner_add)
    pd = psub.add_parser("dest", help="set or clear where C-MOVE sends to a partner's AE title")
    pd.add_argument("name")
    dg = pd.add_mutually_exclusive_group(required=True)
    dg.add_argument("destination", nargs="?", type=_destination, metavar="HOST:PORT", help="its storage SCP")
    dg.add_argument("--none", action="store_true", help="the partner is no longer a C-MOVE destination")
    pd.set_defaults(func=cmd_partner_dest)
    pl = psub.add_parser("list", help="list registered partners")
    pl.set_defaults(func=cmd_partner_list)
    pr = psub.add_parser("remove", help="stop accepting a partner")
    pr.add_argument("name")
    pr.set_defaults(func=cmd_partner_remove)

    pp_ = psub.add_parser("policy", help="show or set a partner's de-identification policy")
    pp_.add_argument("name")
    g = pp_.add_mutually_exclusive_group()
    g.add_argument("--set", metavar="FILE", help="policy file (TOML or JSON: options, burned_in)")
    g.add_argument("--default", action="store_true", help="drop the partner's own policy; the operator's default applies")
    pp_.set_defaults(func=cmd_partner_policy)

    qp = sub.add_parser("quarantine", help="objects held back for burned-in annotation")
    qsub = qp.add_subparsers(dest="quarantine_command", required=True)
    ql = qsub.add_parser("list", help="list quarantined instances")
    ql.add_argument("--limit", type=int, default=100)
    ql.set_defaults(func=cmd_quarantine_list)
    qr = qsub.add_parser("release", help="release an instance after checking its pixels")
    qr.add_argument("sop_uid")
    qr.set_defaults(func=cmd_quarantine_release)
    qm = qsub.add_parser("mask", help="black out burned-in text (rule for the device, or --region) and release")
    qm.add_argument("sop_uid")
    qm.add_argument("--region", action="append", type=_region, help="X,Y,WIDTH,HEIGHT to black out (repeatable)")
    qm.set_defaults(func=cmd_quarantine_mask)

    se = sub.add_parser("send", help="send DICOM files, folders and zip files to a DICOM node")
    se.add_argument("host")
    se.add_argument("port", type=int)
    se.add_argument("paths", nargs="+", metavar="PATH")
    se.add_argument("--aec", required=True, type=_valid_ae, help="the node's AE title (called)")
    se.add_argument("--aet", required=True, type=_valid_ae, help="your AE title as registered with the node (calling)")
    se.add_argument("--state", help="file remembering what the node acknowledged (default: per destination, in ~/.local/state/imx)")
    se.add_argument("--retries", type=int, default=5, help="attempts per association, with backoff (default 5)")
    se.add_argument("--no-progress", action="store_true", help="no progress bar")
    se.set_defaults(func=cmd_send)

    an = sub.add_parser("anonymize", help="de-identify a folder, zip or DICOMDIR offline, as ingest would")
    an.add_argument("src", help="folder, zip file or DICOM file")
    an.add_argument("dst", help="output folder: <study>/<series>/<instance>.dcm by new UIDs")
    an.add_argument("--partner", help="the sending hospital whose keys and policy apply (needed when more than one is registered)")
    an.add_argument("--policy", help="a policy file (TOML or JSON) used instead of the partner's")
    an.add_argument("--no-progress", action="store_true", help="no progress bar")
    an.set_defaults(func=cmd_anonymize)

    ck = sub.add_parser("check", help="verify that every indexed instance is stored intact")
    ck.add_argument("--repair", action="store_true", help="remove stored objects no index row refers to")
    ck.set_defaults(func=cmd_check)

    rd = sub.add_parser("render", help="render a frame of a DICOM file to PNG, JPEG or WebP")
    rd.add_argument("src", metavar="IN", help="DICOM file")
    rd.add_argument("out", metavar="OUT", help="output image; the format follows the suffix (.png, .jpg, .webp)")
    rd.add_argument("--frame", type=int, default=1, help="frame number, from 1 (default 1)")
    rd.add_argument("--window", nargs=2, type=float, metavar=("CENTER", "WIDTH"), help="VOI window (default: the object's first, else the frame's range)")
    rd.add_argument("--size", type=_viewport, metavar="WxH", help="fit inside this viewport, keeping the aspect ratio (never enlarged)")
    rd.add_argument("--quality", type=int, default=90, help="JPEG and WebP quality, 1-100 (default 90)")
    rd.set_defaults(func=cmd_render)

    st = sub.add_parser("settings", help="list every IMX_ setting with its default")
    st.set_defaults(func=cmd_settings)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
