"""Real DCMTK peers for the tests: storescp on 127.0.0.1, and where to find DCMTK's binaries.

DCMTK is the reference implementation mercure ships (dcmsend/storescp 3.6.7), so "byte-identical
at the far end" and "same report as dcmsend" are only worth something against the real thing.
pynetdicom installs its own ``storescp``/``echoscu`` into the venv's ``bin/``, which shadows
DCMTK's when the venv is active, so binaries are resolved by absolute path, never by bare name.
Missing DCMTK skips locally but fails on CI (``CI`` set): a green CI run must have used it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.peers.base import Peer, missing
from tests.peers.net import free_port, stop_process, wait_for_port

__all__ = ["StoreSCP", "dcmtk_binary", "free_port", "wait_for_port"]


def dcmtk_binary(name: str) -> str:
    """Absolute path of DCMTK's ``name`` (``/usr/bin`` first, then PATH without the venv)."""
    candidate = Path("/usr/bin") / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin
    )
    found = shutil.which(name, path=path)
    if found and Path(found).parent != Path(venv_bin):
        return found
    missing(f"DCMTK binary {name!r} not found (install the Debian package 'dcmtk')")


_PROFILE_TEMPLATE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[Only]
{contexts}

[[Profiles]]
[Default]
PresentationContexts = Only
"""


class StoreSCP(Peer):
    """DCMTK storescp on a free 127.0.0.1 port, started and always killed by ``with``.

    ``refuse=True`` rejects every association (A-ASSOCIATE-RJ, permanent). ``accept_only``
    limits the accepted storage SOP classes to the given DCMTK names (e.g. ``["MRImageStorage"]``)
    through a generated ``-xf`` profile, so anything else gets no presentation context.
    ``nodelay`` sets ``TCP_NODELAY=1`` for the peer (DCMTK reads it from the environment).
    ``fork=True`` serves associations in parallel (``--fork``); by default storescp handles one
    association at a time, so parallel senders queue up behind each other.
    ``tls=(key, cert, ca)`` accepts only TLS associations (``+tls key cert +cf ca``): our
    certificate and unencrypted key, and the CA that clients' certificates must chain to
    (storescp requires a client certificate by default).
    """

    def __init__(
        self,
        folder: Path,
        *,
        aet: str = "STORESCP",
        refuse: bool = False,
        accept_only: Sequence[str] | None = None,
        nodelay: bool = True,
        fork: bool = False,
        tls: tuple[Path, Path, Path] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.folder = folder
        self.aet = aet
        self.port = 0
        self._refuse = refuse
        self._accept_only = list(accept_only) if accept_only is not None else None
        self._nodelay = nodelay
        self._fork = fork
        self._tls = tls
        self._extra = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = folder.parent / f"{folder.name}.storescp.log"

    def __enter__(self) -> StoreSCP:
        binary = dcmtk_binary("storescp")
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [binary, "-aet", self.aet, "-od", str(self.folder), "-dhl"]
        if self._refuse:
            args.append("--refuse")
        if self._fork:
            args.append("--fork")
        if self._accept_only is not None:
            cfg = self.folder.parent / f"{self.folder.name}.storescp.cfg"
            lines = [
                f"PresentationContext{i} = {name}\\Uncompressed"
                for i, name in enumerate(["VerificationSOPClass", *self._accept_only], 1)
            ]
            cfg.write_text(_PROFILE_TEMPLATE.format(contexts="\n".join(lines)))
            args += ["-xf", str(cfg), "Default"]
        if self._tls is not None:
            key, cert, ca = self._tls
            args += ["+tls", str(key), str(cert), "+cf", str(ca)]
        args += self._extra
        env = dict(os.environ)
        if self._nodelay:
            env["TCP_NODELAY"] = "1"
        else:
            env.pop("TCP_NODELAY", None)
        for _attempt in range(5):
            self.port = free_port()
            log = self._log.open("ab")
            self._proc = subprocess.Popen(
                [*args, str(self.port)],
                env=env,
                stdin=subprocess.DEVNULL,  # never wait for a key password prompt
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            time.sleep(0.05)
            if self._proc.poll() is None:  # else: port was taken meanwhile, try another
                break
        assert self._proc is not None
        wait_for_port(self.port, proc=self._proc)
        return self

    def stop(self) -> None:
        stop_process(self._proc, grace=0)

    def log(self) -> str:
        """What storescp printed so far (for assertion messages)."""
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> file, for every object storescp has written to ``folder``."""
        from pydicom import dcmread

        out: dict[str, Path] = {}
        for path in sorted(self.folder.iterdir()):
            if path.is_file():
                ds = dcmread(path, stop_before_pixels=True)
                out[str(ds.SOPInstanceUID)] = path
        return out
