"""Tests for crypto.keyfiles: saving and loading key files."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from crypto.keyfiles import (
    KeyFileError,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
)
from crypto.keys import SigningKey

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX-specific")

KEY = SigningKey.derive(11, "replica/0")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    # With umask 0 nothing masks the creation mode, so a careless 0o666 would show.
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_private_key_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "replica-0.pem"
    save_private_key(path, KEY)
    loaded = load_private_key(path)
    assert loaded.private_bytes() == KEY.private_bytes()
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_private_key_accepts_string_path(tmp_path: Path) -> None:
    path = str(tmp_path / "replica-0.pem")
    save_private_key(path, KEY)
    assert load_private_key(path).verify_key == KEY.verify_key


@pytest.mark.usefixtures("permissive_umask")
def test_saved_private_key_file_mode_is_0o600(tmp_path: Path) -> None:
    path = tmp_path / "replica-0.pem"
    save_private_key(path, KEY)
    assert _mode(path) == 0o600


def test_private_key_file_is_created_with_mode_0o600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Restricting the mode only after creation would leave a window where others can read.
    creation_modes: list[int] = []
    real_open = os.open

    def recording_open(path: object, flags: int, mode: int = 0o777, **kwargs: object) -> int:
        if flags & os.O_CREAT:
            creation_modes.append(mode)
        return real_open(path, flags, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", recording_open)
    save_private_key(tmp_path / "replica-0.pem", KEY)
    assert creation_modes == [0o600]


def test_save_replaces_existing_key_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "replica-0.pem"
    save_private_key(path, SigningKey.derive(11, "replica/9"))
    save_private_key(path, KEY)
    assert load_private_key(path).verify_key == KEY.verify_key
    assert [entry.name for entry in tmp_path.iterdir()] == ["replica-0.pem"]


def test_failed_save_keeps_old_key_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "replica-0.pem"
    save_private_key(path, KEY)
    original = path.read_bytes()

    def failing_replace(source: object, destination: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyFileError, match="disk full"):
        save_private_key(path, SigningKey.derive(11, "replica/9"))
    assert path.read_bytes() == original
    assert [entry.name for entry in tmp_path.iterdir()] == ["replica-0.pem"]


def test_save_into_missing_directory_fails_with_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="missing"):
        save_private_key(tmp_path / "missing" / "key.pem", KEY)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_loading_private_key_readable_by_group_or_others_fails(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "replica-0.pem"
    save_private_key(path, KEY)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="group or others") as caught:
        load_private_key(path)
    assert str(path) in str(caught.value)


def test_loading_owner_read_only_private_key_works(tmp_path: Path) -> None:
    path = tmp_path / "replica-0.pem"
    save_private_key(path, KEY)
    path.chmod(0o400)
    assert load_private_key(path).verify_key == KEY.verify_key


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key at all",
        b"\x00\xff" * 100,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        KEY.private_bytes(),
    ],
)
def test_loading_garbage_private_key_file_fails(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        load_private_key(path)
    assert str(path) in str(caught.value)


def test_loading_non_ed25519_private_key_fails(tmp_path: Path) -> None:
    path = tmp_path / "ecdsa.pem"
    ecdsa_key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(ecdsa_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_private_key(path)


def test_loading_encrypted_private_key_fails(tmp_path: Path) -> None:
    path = tmp_path / "encrypted.pem"
    path.write_bytes(
        KEY.private_key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"password")
        )
    )
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="unencrypted"):
        load_private_key(path)


def test_loading_oversized_private_key_file_fails(tmp_path: Path) -> None:
    path = tmp_path / "huge.pem"
    path.write_bytes(b"A" * (1024 * 1024))
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="larger than"):
        load_private_key(path)


def test_loading_missing_private_key_fails(tmp_path: Path) -> None:
    path = tmp_path / "absent.pem"
    with pytest.raises(KeyFileError, match="does not exist") as caught:
        load_private_key(path)
    assert str(path) in str(caught.value)


def test_loading_directory_as_key_fails(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path)
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path)


def test_public_key_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "replica-0.pub"
    save_public_key(path, KEY.verify_key)
    assert path.read_text() == KEY.verify_key.hex() + "\n"
    assert load_public_key(path) == KEY.verify_key


def test_public_key_file_may_be_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "replica-0.pub"
    save_public_key(path, KEY.verify_key)
    path.chmod(0o644)
    assert load_public_key(path) == KEY.verify_key


def test_public_key_without_trailing_newline_loads(tmp_path: Path) -> None:
    path = tmp_path / "replica-0.pub"
    path.write_text(KEY.verify_key.hex())
    assert load_public_key(path) == KEY.verify_key


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"zz" * 32 + b"\n",
        b"ab" * 31 + b"\n",
        b"\xff" * 64,
        b"  " + KEY.verify_key.hex().encode() + b"\n",
        KEY.verify_key.public_bytes(),
    ],
)
def test_loading_garbage_public_key_file_fails(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pub"
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as caught:
        load_public_key(path)
    assert str(path) in str(caught.value)


def test_loading_missing_public_key_fails(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_public_key(tmp_path / "absent.pub")
