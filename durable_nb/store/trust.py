"""Which stored steps this user's kernels wrote: an HMAC over each step's record.

A store is a file people copy, share, download and commit, and replaying a step unpickles
its state, which can run any code. So, as Jupyter signs the notebooks a user trusts, every
step row is signed at commit with a secret that never leaves this machine (a file beside
Jupyter's own `notebook_secret`), over what replay uses: the step's identity, code
fingerprint, inputs, outputs, and its state's layout with the integrity checks of every
chunk (see db.integrity_check). A row whose signature does not verify (written elsewhere,
edited, or older than signing) is never unpickled: the step executes instead, and
`durable-nb trust` re-signs a store the user vouches for.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from typing import Any, Sequence

SECRET_FILE_ENV = "DURABLE_NB_SECRET_FILE"
SECRET_FILENAME = "durable_nb_secret"


def secret_path() -> str:
    """$DURABLE_NB_SECRET_FILE, else `durable_nb_secret` in Jupyter's data directory."""
    explicit = os.environ.get(SECRET_FILE_ENV)
    if explicit:
        return os.path.abspath(explicit)
    try:
        from jupyter_core.paths import jupyter_data_dir
    except ImportError:  # IPython without Jupyter: where jupyter_core would put it on Linux
        directory = os.environ.get("JUPYTER_DATA_DIR") or os.path.join(
            os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "jupyter")
    else:
        directory = jupyter_data_dir()
    return os.path.join(directory, SECRET_FILENAME)


def load_secret(path: str | None = None) -> bytes:
    """The secret, made on first use (readable by this user only). Two kernels starting at
    once agree on one: the file is written whole under a temporary name, then linked into
    place only if no other process got there first."""
    path = path or secret_path()
    try:
        with open(path, "rb") as handle:
            secret = handle.read()
        if secret:
            return secret
    except FileNotFoundError:
        pass
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".durable_nb_secret-")
    try:
        with os.fdopen(descriptor, "wb") as handle:  # mkstemp makes it mode 0600
            handle.write(secrets.token_hex(32).encode())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        os.remove(temporary)
    with open(path, "rb") as handle:
        return handle.read()


class Signer:
    """Signs and verifies step rows with one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def for_this_user(cls) -> Signer:
        return cls(load_secret())

    def sign(self, fields: Sequence[Any], inline_data: bytes | None) -> str:
        """An HMAC-SHA256 over the fields (JSON-able values, in order) and inline bytes."""
        mac = hmac.new(self._secret, json.dumps(list(fields), default=str).encode(), hashlib.sha256)
        mac.update(b"\0")
        mac.update(inline_data or b"")
        return "hmac-sha256:" + mac.hexdigest()

    def verify(self, fields: Sequence[Any], inline_data: bytes | None, signature: str | None) -> bool:
        return signature is not None and hmac.compare_digest(self.sign(fields, inline_data), signature)
