"""near_duplicate (with `data.near_duplicates`): records with nearly the same words as an earlier one."""

from __future__ import annotations

import hashlib

import numpy as np

NEAR_DUP_PERMUTATIONS = 64
NEAR_DUP_BANDS = 16  # 16 bands of 4 rows: candidates from Jaccard ~0.5, verified at the threshold
NEAR_DUP_THRESHOLD = 0.8
NEAR_DUP_SHINGLE = 5  # words per shingle
NEAR_DUP_MAX_WORDS = 2000  # words of each record looked at (bounds time)
NEAR_DUP_MAX_INDEXED = 200_000  # records whose signatures are kept (bounds memory: ~512 B each)


class NearDuplicates:
    """MinHash over word shingles with LSH banding: deterministic, bounded memory and time."""

    def __init__(self) -> None:
        rng = np.random.default_rng(20240611)
        self.seeds = rng.integers(1, 2**63 - 1, size=NEAR_DUP_PERMUTATIONS, dtype=np.uint64) | np.uint64(1)
        self.buckets: dict[tuple[int, bytes], int] = {}
        self.signatures: list[bytes] = []
        self.locations: list[str] = []

    def signature(self, text: str) -> np.ndarray | None:
        words = text.lower().split()[:NEAR_DUP_MAX_WORDS]
        if len(words) < NEAR_DUP_SHINGLE:
            return None  # too short to judge by shingles
        shingles = {
            " ".join(words[i : i + NEAR_DUP_SHINGLE]) for i in range(len(words) - NEAR_DUP_SHINGLE + 1)
        }
        hashes = np.fromiter(
            (
                int.from_bytes(
                    hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
                )
                for s in shingles
            ),
            dtype=np.uint64,
            count=len(shingles),
        )
        with np.errstate(over="ignore"):
            mixed = hashes[:, None] * self.seeds[None, :]
            mixed ^= mixed >> np.uint64(29)
        return mixed.min(axis=0)

    def check(self, text: str, location: str) -> str | None:
        """The location of an earlier record this one nearly duplicates, else None (then indexed)."""
        sig = self.signature(text)
        if sig is None:
            return None
        rows = NEAR_DUP_PERMUTATIONS // NEAR_DUP_BANDS
        keys = [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(NEAR_DUP_BANDS)]
        for key in keys:
            other = self.buckets.get(key)
            if other is None:
                continue
            theirs = np.frombuffer(self.signatures[other], dtype=np.uint64)
            if float((theirs == sig).mean()) >= NEAR_DUP_THRESHOLD:
                return self.locations[other]
        if len(self.signatures) < NEAR_DUP_MAX_INDEXED:
            index = len(self.signatures)
            self.signatures.append(sig.tobytes())
            self.locations.append(location)
            for key in keys:
                self.buckets.setdefault(key, index)
        return None
