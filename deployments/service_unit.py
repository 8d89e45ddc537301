"""A systemd unit for ``dicom-dispatch serve``, written for a named user (mercure's folders' owner).

The template (``dicom-dispatch.service.in`` beside this module) fixes the restart policy and a
stop timeout longer than the service's own shutdown (sends in flight, the background executor,
the runner, the embedded server and database). ``python -m deployments.service_unit --user U``
writes ``/etc/systemd/system/dicom-dispatch.service``; ``systemctl daemon-reload`` and
``systemctl enable --now dicom-dispatch`` are then the operator's.
"""

from __future__ import annotations

import argparse
import grp
import pwd
import shutil
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_UNIT_PATH", "STOP_TIMEOUT_SECONDS", "UnitSpec", "install_unit", "render_unit"]

TEMPLATE = Path(__file__).with_name("dicom-dispatch.service.in")
DEFAULT_UNIT_PATH = Path("/etc/systemd/system/dicom-dispatch.service")
#: Above serve's own shutdown budget (30 s jobs + 30 s runner + 20 s server + 30 s database)
#: with room for the sends in flight to finish.
STOP_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class UnitSpec:
    user: str
    group: str
    data_dir: Path
    executable: str


def spec_for(user: str, group: str | None = None, data_dir: Path | None = None) -> UnitSpec:
    """The unit's values for ``user``: its primary group, ``~user/.dicom-dispatch``, our CLI."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"no such user: {user}") from None
    if group is None:
        group = grp.getgrgid(entry.pw_gid).gr_name
    else:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ValueError(f"no such group: {group}") from None
    home = data_dir or Path(entry.pw_dir) / ".dicom-dispatch"
    cli = shutil.which("dicom-dispatch") or str(Path(sys.executable).with_name("dicom-dispatch"))
    return UnitSpec(user, group, home.absolute(), cli)


def render_unit(spec: UnitSpec) -> str:
    """The unit's text; ``ValueError`` if a value holds a control character (a newline in a
    value would add lines of its own to the unit: another ``ExecStart``, ``User=root``)."""
    text = TEMPLATE.read_text(encoding="utf-8")
    for key, value in {
        "@USER@": spec.user,
        "@GROUP@": spec.group,
        "@DATA_DIR@": str(spec.data_dir),
        "@EXEC@": spec.executable,
        "@STOP_TIMEOUT@": str(STOP_TIMEOUT_SECONDS),
    }.items():
        if any(unicodedata.category(char) == "Cc" for char in value):
            raise ValueError(f"{key.strip('@').lower()} {value!r} holds a control character")
        text = text.replace(key, value)
    return text


def install_unit(spec: UnitSpec, output: Path = DEFAULT_UNIT_PATH) -> Path:
    """Write the unit and create the data directory owned by the user; returns the unit's path."""
    text = render_unit(spec)  # refused values leave nothing behind
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    spec.data_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(spec.data_dir, spec.user, spec.group)
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dicom-dispatch install-service`` (and of this module's ``main``)."""
    parser.add_argument("--user", required=True, help="the user that owns mercure's folders")
    parser.add_argument("--group", help="default: the user's primary group")
    parser.add_argument("--data-dir", type=Path, help="default: ~USER/.dicom-dispatch")
    parser.add_argument("--output", type=Path, default=DEFAULT_UNIT_PATH)


def install_from_args(args: argparse.Namespace) -> Path:
    """Write the unit the parsed options describe; ``ValueError``/``OSError`` if it cannot."""
    return install_unit(spec_for(args.user, args.group, args.data_dir), args.output)


NEXT_STEP = "systemctl daemon-reload && systemctl enable --now dicom-dispatch"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.service_unit",
        description="Write a systemd unit that runs `dicom-dispatch serve` as USER.",
    )
    add_arguments(parser)
    try:
        path = install_from_args(parser.parse_args(argv))
    except (ValueError, OSError) as exc:
        print(f"dicom-dispatch: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}; now: {NEXT_STEP}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
