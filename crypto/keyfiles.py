"""Reading and writing key files. The only crypto module that does file I/O."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from crypto.keys import KeyFormatError, SigningKey, VerifyKey

PRIVATE_KEY_MODE: Final = 0o600
PUBLIC_KEY_MODE: Final = 0o644
# Key files are a few hundred bytes; the cap stops a wrong path from reading a huge file.
MAX_KEY_FILE_SIZE_BYTES: Final = 64 * 1024


class KeyFileError(Exception):
    """A key file is missing, unreadable, malformed or insecure; the message names it."""


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half.

    The temporary file is created with `mode` (not chmod-ed afterwards), so a private
    key is never readable by others, not even for an instant.
    """
    directory = path.parent
    temporary = directory / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as error:
        raise KeyFileError(f"cannot create key file {path}: {error}") from error
    try:
        try:
            # The umask may have cleared bits of `mode`; set it exactly, as loaders check it.
            os.fchmod(descriptor, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write key file {path}: {error}") from error
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Best effort: not every platform can open a directory.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _read_key_file(path: Path, *, private: bool) -> bytes:
    try:
        # Opening first and then checking the open file avoids a check-then-open race;
        # O_NONBLOCK keeps a FIFO at that path from hanging us before the check.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(descriptor, "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise KeyFileError(f"key file {path} is not a regular file")
            permissions = stat.S_IMODE(status.st_mode)
            if private and os.name == "posix" and permissions & 0o077:
                raise KeyFileError(
                    f"private key file {path} is accessible by group or others "
                    f"(mode {permissions:#o}); restrict it with: chmod 600 {path}"
                )
            data = file.read(MAX_KEY_FILE_SIZE_BYTES + 1)
    except FileNotFoundError as error:
        raise KeyFileError(f"key file {path} does not exist") from error
    except OSError as error:
        raise KeyFileError(f"cannot read key file {path}: {error}") from error
    if len(data) > MAX_KEY_FILE_SIZE_BYTES:
        raise KeyFileError(f"key file {path} is larger than {MAX_KEY_FILE_SIZE_BYTES} bytes")
    return data


def save_private_key(path: str | os.PathLike[str], key: SigningKey) -> None:
    """Write `key` as unencrypted PKCS8 PEM, atomically, with mode 0o600."""
    pem = key.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    _write_atomically(Path(path), pem, PRIVATE_KEY_MODE)


def load_private_key(path: str | os.PathLike[str]) -> SigningKey:
    path = Path(path)
    data = _read_key_file(path, private=True)
    try:
        private_key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        # TypeError is how cryptography reports an encrypted key loaded without a password.
        raise KeyFileError(f"key file {path} is not an unencrypted PEM private key") from error
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyFileError(
            f"key file {path} holds a {type(private_key).__name__}, not an Ed25519 key"
        )
    return SigningKey(private_key)


def save_public_key(path: str | os.PathLike[str], key: VerifyKey) -> None:
    """Write `key` as one line of hex."""
    _write_atomically(Path(path), (key.hex() + "\n").encode("ascii"), PUBLIC_KEY_MODE)


def load_public_key(path: str | os.PathLike[str]) -> VerifyKey:
    path = Path(path)
    data = _read_key_file(path, private=False)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as error:
        raise KeyFileError(f"public key file {path} is not ASCII hex") from error
    # Tolerate the trailing newline (and a CRLF from an editor), nothing else.
    try:
        return VerifyKey.from_hex(text.rstrip("\r\n"))
    except KeyFormatError as error:
        raise KeyFileError(f"public key file {path}: {error}") from error
