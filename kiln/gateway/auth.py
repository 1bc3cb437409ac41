"""API keys, kept as SHA-256 digests and compared in constant time, and the principal each
one stands for (its name, its limits, enforced in ``limits.py``, and whether it may use the
admin routes: only a keys-file entry with ``admin: true``, never a key from the environment)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from kiln.gateway.config import GatewayError, Limits

KEY_PREFIX = "sk-kiln-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from, their limits, and whether they may use the admin routes."""

    name: str
    limits: Limits
    admin: bool = False


ANONYMOUS = "anonymous"


class KeyStore:
    """Digest -> principal. ``check`` hashes the presented key and compares it with every
    stored digest (hmac.compare_digest, no early exit), so timing reveals neither the key
    nor which entry matched. Without keys every request is the one anonymous principal,
    which has the default limits: all clients share its buckets."""

    def __init__(self, entries: list[tuple[str, Principal]], defaults: Limits = Limits()):
        self._entries = [(bytes.fromhex(d), p) for d, p in entries]
        self.anonymous = Principal(ANONYMOUS, defaults)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def has_admin(self) -> bool:
        """Some key may use the admin routes (without keys nobody may)."""
        return any(p.admin for _, p in self._entries)

    def check(self, presented: str | None) -> Principal | None:
        if not self._entries:
            return self.anonymous
        if not presented:
            return None
        d = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, d):
                found = principal
        return found

    @classmethod
    def load(cls, keys_file: Path | None, env_keys: list[str], defaults: Limits) -> "KeyStore":
        entries: list[tuple[str, Principal]] = []
        for i, key in enumerate(env_keys):
            entries.append((digest(key), Principal(f"env-{i}", defaults)))
        if keys_file is not None:
            entries += _read_keys_file(Path(keys_file), defaults)
        return cls(entries, defaults)


def _read_keys_file(path: Path, defaults: Limits) -> list[tuple[str, Principal]]:
    """YAML list of {name, key | sha256, rpm?, tpm?, admin?}; a bare string is a key (not admin)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise GatewayError(f"cannot read keys file {path}: {err}") from None
    if isinstance(data, dict) and "keys" in data:
        data = data["keys"]
    if not isinstance(data, list) or not data:
        # an empty file must not quietly turn authentication off
        raise GatewayError(f"{path}: expected a non-empty list of keys (or a mapping with `keys:`)")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {"key": item}
        if not isinstance(item, dict):
            raise GatewayError(f"{path}: entry {i} must be a string or a mapping")
        if ("key" in item) == ("sha256" in item):
            raise GatewayError(f"{path}: entry {i} needs exactly one of `key` or `sha256`")
        d = digest(str(item["key"])) if "key" in item else str(item["sha256"]).lower().removeprefix("sha256:")
        if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
            raise GatewayError(f"{path}: entry {i}: sha256 must be 64 hex digits")
        name = str(item.get("name", f"key-{i}"))
        admin = item.get("admin", False)
        if not isinstance(admin, bool):  # `admin: "no"` must not grant admin by being truthy
            raise GatewayError(f"{path}: entry {i} ({name!r}): admin must be true or false (got {admin!r})")
        limits = Limits(rpm=item.get("rpm", defaults.rpm), tpm=item.get("tpm", defaults.tpm))
        out.append((d, Principal(name, limits, admin)))
    return out
