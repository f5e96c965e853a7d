"""The ``imx`` command.

    imx serve                                   run the node, the HTTP app and the spool drainer
    imx partner add NAME --ae AE [--host H]... [--dest HOST:PORT]
                                                register a partner hospital (works while serving)
    imx partner dest NAME HOST:PORT|--none      where C-MOVE sends to the partner's AE title
    imx partner list | remove NAME
    imx partner policy NAME [--set FILE | --default | --show]
                                                a partner's de-identification policy
    imx partner tz NAME ZONE|--default          the hospital's IANA time zone (consultation times)
    imx quarantine list | release SOP_UID | mask SOP_UID [--region X,Y,W,H]...
                                                objects held back for burned-in annotation
    imx send HOST PORT PATH... --aec AE --aet AE send DICOM files, folders and zips to a node
    imx anonymize SRC DST [--partner NAME] [--policy FILE]
                                                de-identify a folder, zip or DICOMDIR offline
    imx user add NAME --role admin|specialist|partner [--partner NAME] [--display-name TEXT]
                                                a person who logs in (password from stdin, or generated)
    imx user list | disable NAME | enable NAME | password NAME [--generate]
    imx user token NAME [--label L] [--days N]  an API token for DICOMweb tools (printed once)
    imx user grant-all NAME [--revoke]          let a specialist see every study
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
    _console_audit(index, "partner_changed", p.name, {"created": True})
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
    _console_audit(index, "partner_changed", args.name, {"changed": ["destination"]})
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
    _console_audit(index, "partner_changed", args.name, {"removed": what})
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
        _console_audit(index, "partner_changed", args.name, {"changed": ["policy"]})
        print(f"partner {args.name}: policy set")
    elif args.default:
        index.set_partner_policy(args.name, None)
        _console_audit(index, "partner_changed", args.name, {"changed": ["policy"], "default": True})
        print(f"partner {args.name}: the operator's default policy applies")
    p = index.partner_by_name(args.name)
    own = getattr(p, "policy", None)
    policy = Policy.from_json(own) if own else (Policy.load(settings.policy_file) if settings.policy_file else Policy.default())
    print(f"{'own' if own else 'default'} policy: options {', '.join(policy.to_mapping()['options']) or '(Basic Profile only)'}; burned-in: {policy.burned_in.value}")
    return 0


def cmd_partner_tz(args: argparse.Namespace) -> int:
    """Set a partner's IANA time zone; consultation times are shown in it (NULL: Asia/Urumqi)."""
    from storage.consultations import DEFAULT_ZONE
    from viewer.i18n_server import UnknownZone, check_zone

    if (args.zone is None) == (not args.default):
        print("imx: give a time zone (such as Asia/Almaty) or --default", file=sys.stderr)
        return 2
    try:
        zone_name = None if args.default else check_zone(args.zone)
    except UnknownZone as e:
        print(f"imx: {e}", file=sys.stderr)
        return 2
    index = _index(_settings())
    if not index.set_partner_time_zone(args.name, zone_name):
        print(f"imx: no partner named {args.name!r}", file=sys.stderr)
        return 1
    _console_audit(index, "partner_changed", args.name, {"changed": ["time_zone"]})
    print(f"partner {args.name}: time zone {zone_name or DEFAULT_ZONE}")
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


# -- users --------------------------------------------------------------------------------------
def _read_password(args: argparse.Namespace) -> tuple[str, bool] | None:
    """(password, generated): from stdin when it is piped, generated when it is a terminal or
    with --generate. None (after a message) when the piped one is unusable."""
    from viewer.accounts import generate_password

    if getattr(args, "generate", False) or sys.stdin is None or sys.stdin.isatty():
        return generate_password(), True
    password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("imx: the password (first line of stdin) must have at least 8 characters", file=sys.stderr)
        return None
    return password, False


def _console_audit(index, action: str, target: str, detail: dict) -> None:  # type: ignore[no-untyped-def]
    """An audit row for a change made at the console: user ``console``, the operating-system
    account in the detail. Targets are our own names (users, partner hospitals, token ids)."""
    import getpass
    import json

    from storage.access import Accounts

    try:
        os_user = getpass.getuser()
    except Exception:
        os_user = "unknown"
    Accounts(index).add_audit(
        action,
        user_id=None,
        username="console",
        address=None,
        target_kind={"user_changed": "user", "token_created": "token", "partner_changed": "partner"}.get(action),
        target=target,
        detail=json.dumps({**detail, "os_user": os_user, "via": "cli"}, sort_keys=True),
    )


def cmd_user_add(args: argparse.Namespace) -> int:
    from storage.access import Accounts, UserExists
    from viewer.accounts import valid_user_name
    from viewer.auth import hash_password

    try:
        valid_user_name(args.name)
    except ValueError as e:
        print(f"imx: {e}", file=sys.stderr)
        return 2
    if (args.role == "partner") != (args.partner is not None):
        print("imx: a partner user needs --partner NAME (its hospital), and only a partner user has one", file=sys.stderr)
        return 2
    index = _index(_settings())
    partner_id = None
    if args.partner is not None:
        p = index.partner_by_name(args.partner)
        if p is None:
            print(f"imx: no active partner named {args.partner!r} (imx partner list)", file=sys.stderr)
            return 1
        partner_id = p.id
    got = _read_password(args)
    if got is None:
        return 2
    password, generated = got
    try:
        Accounts(index).add_user(
            args.name, args.role, hash_password(password), partner_id=partner_id, display_name=args.display_name
        )
    except UserExists:
        print(f"imx: a user named {args.name!r} exists", file=sys.stderr)
        return 1
    _console_audit(index, "user_changed", args.name, {"created": True, "role": args.role})
    where = f" of partner {args.partner}" if args.partner else ""
    print(f"user {args.name} added: {args.role}{where}")
    if generated:
        print(f"password (shown once, write it down): {password}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    from storage.access import Accounts

    index = _index(_settings())
    users = Accounts(index).users()
    if not users:
        print("no users (imx user add NAME --role admin)")
        return 0
    partners = {p.id: p.name for p in index.partners()}
    w = max(4, *(len(u.name) for u in users))
    print(f"{'NAME':<{w}}  {'ROLE':<12}  {'PARTNER':<16}  {'STATE':<8}  LAST LOGIN")
    for u in users:
        role = u.role + ("*" if u.all_studies else "")
        last = u.last_login_at.strftime("%Y-%m-%d %H:%M UTC") if u.last_login_at else "never"
        state = "active" if u.active else "disabled"
        print(f"{u.name:<{w}}  {role:<12}  {partners.get(u.partner_id, '-') if u.partner_id else '-':<16}  {state:<8}  {last}")
    if any(u.all_studies for u in users):
        print("* a specialist who sees every study (imx user grant-all)")
    return 0


def _user(index, name: str):  # type: ignore[no-untyped-def]
    from storage.access import Accounts

    user = Accounts(index).user_by_name(name)
    if user is None:
        print(f"imx: no user named {name!r}", file=sys.stderr)
    return user


def cmd_user_disable(args: argparse.Namespace) -> int:
    from storage.access import Accounts

    index = _index(_settings())
    user = _user(index, args.name)
    if user is None:
        return 1
    tokens = Accounts(index).update_user(user.id, active=False)
    _console_audit(index, "user_changed", user.name, {"changed": ["active"], "active": False})
    print(f"user {user.name} disabled: sessions ended, {tokens} API token(s) revoked")
    return 0


def cmd_user_enable(args: argparse.Namespace) -> int:
    from storage.access import Accounts

    index = _index(_settings())
    user = _user(index, args.name)
    if user is None:
        return 1
    Accounts(index).update_user(user.id, active=True, failed_logins=0)
    _console_audit(index, "user_changed", user.name, {"changed": ["active"], "active": True})
    print(f"user {user.name} enabled (its old API tokens stay revoked)")
    return 0


def cmd_user_password(args: argparse.Namespace) -> int:
    from storage.access import Accounts
    from viewer.auth import hash_password

    index = _index(_settings())
    user = _user(index, args.name)
    if user is None:
        return 1
    got = _read_password(args)
    if got is None:
        return 2
    password, generated = got
    Accounts(index).update_user(user.id, password_hash=hash_password(password), failed_logins=0)
    _console_audit(index, "user_changed", user.name, {"changed": ["password"]})
    print(f"user {user.name}: password changed, its sessions ended")
    if generated:
        print(f"password (shown once, write it down): {password}")
    return 0


def cmd_user_token(args: argparse.Namespace) -> int:
    import datetime as dt

    from storage.access import Accounts
    from storage.index import utcnow
    from viewer.auth import new_secret, secret_hash

    index = _index(_settings())
    user = _user(index, args.name)
    if user is None:
        return 1
    if not user.active:
        print(f"imx: user {user.name} is disabled (imx user enable)", file=sys.stderr)
        return 1
    secret = new_secret()
    expires = utcnow() + dt.timedelta(days=args.days) if args.days else None
    token_id = Accounts(index).add_token(user.id, args.label, secret_hash(secret), expires)
    _console_audit(index, "token_created", str(token_id), {"user": user.name, "label": args.label})
    until = f"until {expires:%Y-%m-%d %H:%M} UTC" if expires else "with no expiry"
    print(f"API token {token_id} for {user.name} ({args.label}), valid {until}; shown once:", file=sys.stderr)
    print(secret)
    return 0


def cmd_user_grant_all(args: argparse.Namespace) -> int:
    from storage.access import Accounts

    index = _index(_settings())
    user = _user(index, args.name)
    if user is None:
        return 1
    if user.role != "specialist":
        print(f"imx: only a specialist can be granted every study; {user.name} is {user.role}", file=sys.stderr)
        return 2
    Accounts(index).update_user(user.id, all_studies=not args.revoke)
    _console_audit(index, "user_changed", user.name, {"changed": ["all_studies"], "all_studies": not args.revoke})
    if args.revoke:
        print(f"user {user.name} sees the studies of consultations assigned to them only")
    else:
        print(f"user {user.name} sees every study")
    return 0


def _positive_days(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 3650:
        raise argparse.ArgumentTypeError("days is a whole number from 1 to 3650")
    return int(value)


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
    ptz = psub.add_parser("tz", help="set a partner's time zone (IANA name, e.g. Asia/Bishkek)")
    ptz.add_argument("name")
    ptz.add_argument("zone", nargs="?", help="an IANA time zone such as Asia/Almaty")
    ptz.add_argument("--default", action="store_true", help="back to the service's zone, Asia/Urumqi")
    ptz.set_defaults(func=cmd_partner_tz)

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

    up = sub.add_parser("user", help="people who log in to the viewer and DICOMweb: add, list, disable, tokens")
    usub = up.add_subparsers(dest="user_command", required=True)
    ua = usub.add_parser("add", help="add a user; the password is read from stdin, or generated and printed once")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=["admin", "specialist", "partner"])
    ua.add_argument("--partner", help="the partner hospital of a partner user")
    ua.add_argument("--display-name", help="a name to show in the viewer")
    ua.add_argument("--generate", action="store_true", help="generate the password (printed once) even when stdin is piped")
    ua.set_defaults(func=cmd_user_add)
    ul = usub.add_parser("list", help="list users")
    ul.set_defaults(func=cmd_user_list)
    ud = usub.add_parser("disable", help="stop a user: refuses logins, ends sessions, revokes API tokens")
    ud.add_argument("name")
    ud.set_defaults(func=cmd_user_disable)
    ue = usub.add_parser("enable", help="let a disabled user log in again")
    ue.add_argument("name")
    ue.set_defaults(func=cmd_user_enable)
    upw = usub.add_parser("password", help="set a user's password (from stdin, or generated and printed once)")
    upw.add_argument("name")
    upw.add_argument("--generate", action="store_true", help="generate the password even when stdin is piped")
    upw.set_defaults(func=cmd_user_password)
    ut = usub.add_parser("token", help="create an API token (Bearer) for DICOMweb tools; printed once on stdout")
    ut.add_argument("name")
    ut.add_argument("--label", default="cli", help="what the token is for (default cli)")
    ut.add_argument("--days", type=_positive_days, help="days until it expires (default: never)")
    ut.set_defaults(func=cmd_user_token)
    ug = usub.add_parser("grant-all", help="let a specialist see every study (or --revoke)")
    ug.add_argument("name")
    ug.add_argument("--revoke", action="store_true", help="back to the studies of assigned consultations")
    ug.set_defaults(func=cmd_user_grant_all)

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
