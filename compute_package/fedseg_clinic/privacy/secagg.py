"""Secure aggregation primitives: the server learns the weighted sum of updates, not one.

Pairwise masking with dropout recovery, after Bonawitz et al. 2017 ("Practical Secure
Aggregation for Privacy-Preserving Machine Learning") and its SecAgg+ variant:

- Every clinic holds an X25519 key pair for the session (``c``, to encrypt secret shares
  to its peers) and a fresh X25519 key pair per round (``s``, for masks).
- Clinics u < v agree on a round seed ``HKDF(X25519(s_u, s_v))``; u adds the AES-CTR
  keystream of that seed to its update and v subtracts it, in the ring of integers
  modulo 2**64, so the masks cancel exactly in the sum of all masked updates.
- Updates are FedAvg-weighted before masking: clinic u sends ``Q(n_u * delta_u)``
  (fixed point, :data:`SCALE_BITS` fractional bits); the server divides the unmasked
  sum by the total weight. The result equals the plain weighted mean up to the rounding
  of each clinic's fixed-point value (at most ``2**-(SCALE_BITS+1)`` per coordinate
  before the division).
- Before a round's keys are used, each clinic Shamir-shares its round private key among
  its peers (threshold t, PyCryptodome's Shamir over GF(2^128), two 16-byte halves),
  encrypted to each peer with AES-GCM under ``HKDF(X25519(c_u, c_v))``. If u drops
  after the others masked, t survivors reveal their shares, the server rebuilds u's
  round key and removes u's masks from the survivors' sum.

Only well-kept primitives are used (``cryptography``: X25519, HKDF-SHA256, AES-CTR,
AES-GCM; ``pycryptodome``: Shamir); nothing here implements field arithmetic.

What this does not give: Bonawitz's second (self) mask needs a second exchange per
round, which FEDn rounds (one request, one answer) do not have. A clinic declared
dropped whose masked update nevertheless reaches a curious server later (slow, not
dead) is exposed for that one round once its round key is recovered; see
docs/secure-aggregation.md.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedseg_clinic.errors import FedsegError

SCALE_BITS = 24
# |Q(n * delta)| must stay below 2**MAX_ABS_BITS so that a sum of up to 2**(63 -
# MAX_ABS_BITS) clinics cannot wrap around the signed range of the ring.
MAX_ABS_BITS = 56
_MASK_INFO = b"fedseg secagg mask v1|"
_SHARE_INFO = b"fedseg secagg share v1|"


class SecAggError(FedsegError):
    """A secure-aggregation round cannot complete (the message says why)."""


def b64(data: bytes) -> str:
    """Bytes as ASCII (FEDn settings and metadata carry strings only)."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Inverse of :func:`b64`."""
    return base64.b64decode(text.encode("ascii"), validate=True)


# ---------------------------------------------------------------------------- keys
def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key from the OS's secret randomness."""
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key (what gets secret-shared)."""
    return key.private_bytes_raw()


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    """Inverse of :func:`private_bytes`."""
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public key."""
    return key.public_key().public_bytes_raw()


def agree(own: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both sides derive: HKDF-SHA256 over the X25519 shared secret."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


# ------------------------------------------------------------------ fixed point
def quantise(deltas: Sequence[np.ndarray], weight: int, scale_bits: int = SCALE_BITS
             ) -> list[np.ndarray]:
    """``round(weight * delta * 2**scale_bits)`` as ring elements (uint64, two's complement).

    Raises:
        SecAggError: a value too large for the ring (it would wrap in the sum).
    """
    if weight < 0:
        raise SecAggError(f"weight {weight}: must be >= 0")
    out = []
    for i, delta in enumerate(deltas):
        arr = np.asarray(delta, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise SecAggError(f"update tensor {i}: not finite")
        scaled = np.rint(arr * float(weight) * float(2 ** scale_bits))
        if scaled.size and float(np.max(np.abs(scaled))) >= 2.0 ** MAX_ABS_BITS:
            biggest = float(np.max(np.abs(arr))) * weight
            raise SecAggError(f"update tensor {i}: weight x value {biggest:.3g} too large for "
                              f"the fixed-point ring (2^{MAX_ABS_BITS - scale_bits})")
        out.append(scaled.astype(np.int64).view(np.uint64))
    return out


def dequantise(total: Sequence[np.ndarray], total_weight: int, scale_bits: int = SCALE_BITS
               ) -> list[np.ndarray]:
    """The weighted mean from the unmasked ring sum: signed value / 2**scale / total weight."""
    if total_weight <= 0:
        raise SecAggError(f"total weight {total_weight}: nothing to average")
    return [np.asarray(t, dtype=np.uint64).view(np.int64).astype(np.float64)
            / float(2 ** scale_bits) / float(total_weight) for t in total]


def ring_add(acc: list[np.ndarray], other: Sequence[np.ndarray], sign: int = 1) -> None:
    """``acc += sign * other`` modulo 2**64, in place (uint64 wraps by definition)."""
    if len(acc) != len(other):
        raise SecAggError(f"update has {len(other)} tensors, expected {len(acc)}")
    for a, b in zip(acc, other, strict=True):
        b = np.asarray(b)
        if b.dtype != np.uint64 or b.shape != a.shape:
            raise SecAggError(f"masked tensor {b.dtype}{b.shape}: expected uint64{a.shape}")
        if sign >= 0:
            np.add(a, b, out=a)
        else:
            np.subtract(a, b, out=a)


def ring_zeros(shapes: Iterable[tuple[int, ...]]) -> list[np.ndarray]:
    """Zero ring elements of the given shapes."""
    return [np.zeros(s, dtype=np.uint64) for s in shapes]


# ------------------------------------------------------------------------ masks
def prg_mask(seed: bytes, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """AES-256-CTR keystream of ``seed`` (32 bytes, unique per pair and round) as uint64."""
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = np.frombuffer(encryptor.update(b"\0" * (8 * sum(sizes))), dtype="<u8")
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(stream[start:start + size].astype(np.uint64).reshape(shape))
        start += size
    return out


def pair_sign(own_id: str, peer_id: str) -> int:
    """+1 when ``own_id`` sorts first (it adds the pair's mask), -1 otherwise."""
    if own_id == peer_id:
        raise SecAggError(f"{own_id}: a clinic has no mask with itself")
    return 1 if own_id < peer_id else -1


def mask_seed(own: X25519PrivateKey, peer_public: bytes, context: str) -> bytes:
    """The pair's round seed; ``context`` binds session and round."""
    return agree(own, peer_public, _MASK_INFO + context.encode())


def apply_pair_masks(values: list[np.ndarray], own_id: str, own: X25519PrivateKey,
                     peers: Mapping[str, bytes], context: str) -> None:
    """Add (own_id first) or subtract every pair mask with ``peers`` to ``values`` in place."""
    shapes = [v.shape for v in values]
    for peer_id, peer_public in sorted(peers.items()):
        if peer_id == own_id:
            continue
        ring_add(values, prg_mask(mask_seed(own, peer_public, context), shapes),
                 pair_sign(own_id, peer_id))


# ------------------------------------------------------------- secret sharing
def threshold_for(n_parties: int) -> int:
    """Shares needed to rebuild a key: a strict majority of the clinics (at least 2)."""
    return max(2, n_parties // 2 + 1)


def split_key(raw: bytes, holders: Sequence[str], threshold: int) -> dict[str, bytes]:
    """Shamir-share a 32-byte secret among ``holders``: {holder: index byte + 32 bytes}.

    Raises:
        SecAggError: fewer holders than the threshold, or too many (255).
    """
    from Crypto.Protocol.SecretSharing import Shamir

    if len(raw) != 32:
        raise SecAggError(f"secret of {len(raw)} bytes: expected 32")
    holders = sorted(holders)
    if not 2 <= threshold <= len(holders) <= 255:
        raise SecAggError(f"cannot share among {len(holders)} clinics with threshold {threshold}")
    low = Shamir.split(threshold, len(holders), raw[:16])
    high = Shamir.split(threshold, len(holders), raw[16:])
    return {h: bytes([lo[0]]) + lo[1] + hi[1] for h, lo, hi in zip(holders, low, high, strict=True)}


def combine_key(shares: Iterable[bytes], threshold: int) -> bytes:
    """Rebuild the secret of :func:`split_key` from at least ``threshold`` shares."""
    from Crypto.Protocol.SecretSharing import Shamir

    shares = list(shares)
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    picked = shares[:threshold]
    if any(len(s) != 33 for s in picked):
        raise SecAggError("malformed share (expected 33 bytes)")
    low = Shamir.combine([(s[0], s[1:17]) for s in picked])
    high = Shamir.combine([(s[0], s[17:]) for s in picked])
    return low + high


def _share_key(own: X25519PrivateKey, peer_public: bytes, session: str) -> AESGCM:
    return AESGCM(agree(own, peer_public, _SHARE_INFO + session.encode()))


def encrypt_share(own: X25519PrivateKey, peer_public: bytes, share: bytes, session: str,
                  aad: str) -> str:
    """AES-GCM encrypt a share to one peer (``aad`` names sender, recipient and round)."""
    nonce = os.urandom(12)
    return b64(nonce + _share_key(own, peer_public, session).encrypt(nonce, share, aad.encode()))


def decrypt_share(own: X25519PrivateKey, peer_public: bytes, token: str, session: str,
                  aad: str) -> bytes:
    """Inverse of :func:`encrypt_share` (raises on any tampering)."""
    from cryptography.exceptions import InvalidTag

    raw = unb64(token)
    try:
        return _share_key(own, peer_public, session).decrypt(raw[:12], raw[12:], aad.encode())
    except InvalidTag:
        raise SecAggError(f"share ({aad}): does not decrypt (tampered or wrong key)") from None


def share_aad(sender: str, recipient: str, round_no: int) -> str:
    """Associated data binding a share to who sent it to whom for which round."""
    return f"{sender}>{recipient}@{round_no}"
