"""Errors a user sees: privileges, verifier rejections, libbpf's messages."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from pyebpflb import BpfError, MissingPrivilege, PyEbpfLbError, VerifierError
from pyebpflb._bpf import Object

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def rejected_object(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is not installed: cannot build the object the verifier must reject")
    out = tmp_path_factory.mktemp("bpf") / "unchecked_access.bpf.o"
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True)
    subprocess.run(
        [
            clang,
            "-O2",
            "-g",
            "-target",
            "bpf",
            f"-I/usr/include/{multiarch.stdout.strip()}",
            "-c",
            str(HERE / "bpf" / "unchecked_access.bpf.c"),
            "-o",
            str(out),
        ],
        check=True,
    )
    return out.read_bytes()


def test_verifier_rejection_carries_errno_and_the_verifier_log(rejected_object: bytes) -> None:
    with Object.open(rejected_object, "unchecked") as obj, pytest.raises(VerifierError) as info:
        obj.load()
    error = info.value
    assert isinstance(error, BpfError) and isinstance(error, PyEbpfLbError)
    assert error.errno == 13  # EACCES: the verifier's "invalid access"
    assert "invalid access to packet" in error.log
    assert "unchecked" in str(error) and "invalid access to packet" in str(error)


def test_libbpf_messages_go_to_logging_not_stderr(
    rejected_object: bytes, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="pyebpflb")
    with Object.open(rejected_object, "unchecked") as obj, pytest.raises(VerifierError):
        obj.load()
    assert any(
        r.name == "pyebpflb" and "invalid access to packet" in r.getMessage()
        for r in caplog.records
    )
    assert "libbpf" not in capfd.readouterr().err


UNPRIVILEGED = textwrap.dedent(
    """
    import sys
    import pyebpflb
    from pyebpflb import objects
    try:
        objects.open_object("counter").load()
    except PermissionError as exc:
        print(type(exc).__name__, "|", exc)
        sys.exit(0)
    sys.exit("loaded without privileges")
    """
)


def can_run_as_nobody() -> bool:
    probe = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            sys.executable,
            "-c",
            "import pyebpflb",
        ],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.parametrize("who", ["root-without-capabilities", "nobody"])
def test_loading_without_privileges_raises_permission_error_naming_them(who: str) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing: cannot drop privileges in a subprocess")
    if who == "root-without-capabilities":
        # Root with an empty bounding set gets no capabilities at exec: no
        # CAP_BPF, no CAP_NET_ADMIN, no CAP_SYS_ADMIN.
        drop = ["--inh-caps=-all", "--bounding-set=-all"]
    else:
        if not can_run_as_nobody():
            pytest.skip(
                f"user nobody cannot run {sys.executable} or read the package "
                "(e.g. a Python under /root); the capability-less root case covers this"
            )
        drop = ["--reuid=65534", "--regid=65534", "--clear-groups"]
    out = subprocess.run(
        ["setpriv", *drop, "--", sys.executable, "-c", UNPRIVILEGED],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert out.returncode == 0, out.stderr
    kind, message = out.stdout.split("|", 1)
    assert kind.strip() == MissingPrivilege.__name__
    assert "CAP_BPF" in message and "CAP_NET_ADMIN" in message
    assert "run as root" in message
