"""Where the daemon's socket goes by default, and the /tmp fallback's safety checks."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from devanon.broker import server
from devanon.broker.client import Client
from devanon.broker.server import default_socket_path


def test_the_environment_decides_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVANON_SOCKET", "/somewhere/d.sock")
    assert default_socket_path() == "/somewhere/d.sock"


def test_a_user_without_a_runtime_directory_gets_one_of_their_own_in_tmp(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DEVANON_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)  # not root: no /run/devanon
    named = default_socket_path(make_private=False)
    assert named == "/tmp/devanon-4242/devanon.sock"
    assert not os.path.exists("/tmp/devanon-4242")  # only named


def test_a_fresh_private_directory_is_made_0700(tmp_path: Path) -> None:
    path = tmp_path / "devanon-me"
    assert server._private_directory(str(path)) == str(path)
    st = path.lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert server._private_directory(str(path)) == str(path)  # ours already: fine


def test_our_own_directory_made_open_by_an_older_devanon_is_closed(tmp_path: Path) -> None:
    path = tmp_path / "devanon-me"
    path.mkdir()
    path.chmod(0o755)
    assert server._private_directory(str(path)) == str(path)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o700


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_a_directory_someone_could_have_planted_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "devanon-me"
    if kind == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.write_text("")
        path.chmod(0o600)
    with pytest.raises(PermissionError, match=f"{path} is not a directory of uid"):
        server._private_directory(str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "devanon-me"
    path.mkdir(mode=0o700)
    path.chmod(0o777)  # someone else's, open to all
    os.chown(path, 65534, 65534)
    with pytest.raises(PermissionError, match="owner uid 65534"):
        server._private_directory(str(path))


def test_a_path_too_long_for_a_unix_socket_is_named_before_anything_is_made(
    tmp_path: Path,
) -> None:
    """107 bytes bind; 108 get a ValueError naming the path, from the daemon (which makes
    no directory for it) and from the client, where Python's own error named neither the
    path nor the limit (and the client then blamed a missing daemon)."""
    base = str(tmp_path / "d") + "/"
    fits = base + "x" * (server.SOCKET_PATH_MAX - len(base))
    too_long = fits + "x"
    assert len(os.fsencode(fits)) == server.SOCKET_PATH_MAX
    sock, _ = server.Daemon._listen(fits, 0o600, None)
    sock.close()
    assert stat.S_ISSOCK(os.lstat(fits).st_mode)
    os.unlink(fits)
    os.rmdir(base)
    with pytest.raises(ValueError, match=rf"{too_long}.*\(108 bytes, over 107\)"):
        server.Daemon._listen(too_long, 0o600, None)
    assert not os.path.exists(base)
    with pytest.raises(ValueError, match=rf"{too_long}.*108 bytes"):
        Client(too_long)
    with pytest.raises(ValueError, match="NUL"):
        Client("/tmp/a\0b")


def test_a_symlink_swapped_over_the_new_socket_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever may write the socket's directory can rename a symlink over the socket just
    after the bind: the daemon then refuses to start, and the file the link points to
    keeps its mode and group (a chmod by path, as root, made it 0666)."""
    victim = tmp_path / "precious"
    victim.write_text("secret")
    victim.chmod(0o600)
    path = tmp_path / "d.sock"

    class Swapped(socket.socket):
        def bind(self, address: object) -> None:
            super().bind(address)
            link = tmp_path / "link"
            link.symlink_to(victim)
            os.rename(link, path)  # the attacker's move, in the window

    monkeypatch.setattr(server.socket, "socket", Swapped)
    with pytest.raises(FileExistsError, match="replaced just after the daemon bound it"):
        server.Daemon._listen(str(path), 0o666, os.getgid() + 1)
    st = victim.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == os.getgid()
