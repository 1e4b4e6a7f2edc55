"""Device identities bound to SuperNode keys: which node may speak for which device.

Every Flower SuperNode holds an elliptic-curve key pair (``flower-supernode
--auth-supernode-private-key FILE``, an OpenSSH-format ECDSA key; without one it makes a
throw-away pair at start). The SuperLink verifies a signature with that key on *every* Fleet API
request and binds the node id to it (one node per key), so the public key the ServerApp reads
with ``grid.get_nodes()`` is the authenticated identity of the node behind a node id. With
``--enable-supernode-auth`` (which Flower allows only over TLS) the SuperLink furthermore admits
only nodes whose public keys were registered with ``flwr supernode register``.

A device's ``partition-id`` is, by contrast, self-claimed (``--node-config``). The *device key
roster* closes that gap: a CSV file, issued together with the device keys by whoever issues
device identities (the party the Sybil assumption trusts, ``docs/threat-model.md``), with one line
per device::

    partition-id,public-key
    0,ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAI... device-0
    1,ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAI... device-1

(the public key in OpenSSH form, as ``ssh-keygen -t ecdsa -b 384`` writes it to ``.pub``; a
comment after the key is ignored). With a roster, the server admits a node's claim of device
``d`` only if the node's authenticated key is the one issued for ``d``; any other claim is
refused, logged and counted (``unauthenticated_claim``) and never displaces a node on the
roster. Keys are compared by :func:`fingerprint`, the SHA-256 of the key's DER
SubjectPublicKeyInfo, whatever encoding (PEM, OpenSSH) carried it.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsim.errors import ScenarioError

__all__ = ["DeviceKeys", "fingerprint", "load_device_keys"]

#: device id -> fingerprint of the public key issued for it
DeviceKeys = dict[int, str]


def _load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(text)
    else:
        key = serialization.load_ssh_public_key(b" ".join(text.split()[:2]))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"not an elliptic-curve key ({type(key).__name__})")
    return key


def fingerprint(public_key: bytes | str) -> str:
    """SHA-256 (hex) of a public key's DER SubjectPublicKeyInfo; PEM or OpenSSH input.

    Raises ``ValueError`` when ``public_key`` is not an elliptic-curve public key.
    """
    data = public_key.encode("ascii") if isinstance(public_key, str) else bytes(public_key)
    key = _load_public_key(data)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def load_device_keys(path: str | Path, *, num_devices: int) -> DeviceKeys:
    """Read a device key roster (module docstring); every problem names the file, line and key.

    Parameters
    ----------
    path:
        The CSV file (header ``partition-id,public-key``).
    num_devices:
        The scenario's number of devices: ids must lie in ``[0, num_devices)``.
    """
    p = Path(path)
    where = f"run config device-keys: {p}"
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ScenarioError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{where}: cannot read ({type(exc).__name__})") from None
    rows = list(csv.reader(lines))
    if not rows or [c.strip() for c in rows[0]] != ["partition-id", "public-key"]:
        raise ScenarioError(f"{where}: line 1: expected the header 'partition-id,public-key'")
    keys: DeviceKeys = {}
    owner: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise ScenarioError(f"{where}: line {lineno}: expected 2 fields, got {len(row)}")
        raw_id, raw_key = row[0].strip(), row[1].strip()
        try:
            device = int(raw_id)
        except ValueError:
            raise ScenarioError(f"{where}: line {lineno}: partition-id {raw_id!r} is not an integer") from None
        if not 0 <= device < num_devices:
            raise ScenarioError(f"{where}: line {lineno}: partition-id {device} is outside [0, {num_devices})")
        if device in keys:
            raise ScenarioError(f"{where}: line {lineno}: partition-id {device} is listed twice")
        try:
            fp = fingerprint(raw_key)
        except (ValueError, TypeError) as exc:
            raise ScenarioError(f"{where}: line {lineno}: public-key of device {device} is not an EC public key ({exc})") from None
        if fp in owner:
            raise ScenarioError(
                f"{where}: line {lineno}: device {device} has the same public key as device {owner[fp]} "
                "(one key per device)"
            )
        keys[device] = fp
        owner[fp] = device
    if not keys:
        raise ScenarioError(f"{where}: lists no device")
    return keys
