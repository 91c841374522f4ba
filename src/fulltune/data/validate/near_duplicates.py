"""near_duplicate (with `data.near_duplicates`): records with nearly the same words as an earlier one."""

from __future__ import annotations

import hashlib

import numpy as np

from fulltune.data.fastcheck import ContentIndex

NEAR_DUP_PERMUTATIONS = 64
NEAR_DUP_BANDS = 16  # 16 bands of 4 rows: candidates from Jaccard ~0.5, verified at the threshold
NEAR_DUP_THRESHOLD = 0.8
NEAR_DUP_SHINGLE = 5  # words per shingle
NEAR_DUP_MAX_WORDS = 2000  # words of each record looked at (bounds time)
NEAR_DUP_MAX_INDEXED = 200_000  # records whose signatures are kept (bounds memory: ~1 KB each)
SIGNATURE_CHUNK = 4096  # signatures kept per array


class NearDuplicates:
    """MinHash over word shingles with LSH banding: deterministic, bounded memory and time.

    Each indexed record keeps its signature (512 bytes, a row of an array), a 64-bit digest of each
    of its bands with the record's index (16 x 16 bytes, in a `ContentIndex`: the first record
    with that band owns it) and its location: about 1 KB, ~200 MB at NEAR_DUP_MAX_INDEXED. A band
    digest shared by chance only makes a candidate, which the whole signature then clears."""

    def __init__(self) -> None:
        rng = np.random.default_rng(20240611)
        self.seeds = rng.integers(1, 2**63 - 1, size=NEAR_DUP_PERMUTATIONS, dtype=np.uint64) | np.uint64(1)
        self.bands = ContentIndex()  # band digest -> index of the first record with that band
        self.chunks: list[np.ndarray] = []  # signatures, SIGNATURE_CHUNK rows each
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
        keys = band_digests(sig)
        found, owners = self.bands.lookup(keys)
        for owner in owners[found].tolist():
            theirs = self.chunks[owner // SIGNATURE_CHUNK][owner % SIGNATURE_CHUNK]
            if float((theirs == sig).mean()) >= NEAR_DUP_THRESHOLD:
                return self.locations[owner]
        index = len(self.locations)
        if index < NEAR_DUP_MAX_INDEXED:
            if index % SIGNATURE_CHUNK == 0:
                self.chunks.append(np.empty((SIGNATURE_CHUNK, NEAR_DUP_PERMUTATIONS), dtype=np.uint64))
            self.chunks[-1][index % SIGNATURE_CHUNK] = sig
            self.locations.append(location)
            new = keys[~found]
            self.bands.add_many(new, np.full(len(new), index, dtype=np.uint64))
        return None


def band_digests(sig: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each band of a signature (NEAR_DUP_BANDS rows of consecutive values),
    the band's number mixed in: equal bands of the same number give equal digests."""
    rows = sig.reshape(NEAR_DUP_BANDS, -1)
    with np.errstate(over="ignore"):
        key = np.arange(1, NEAR_DUP_BANDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        for column in rows.T:
            key = (key ^ column) * np.uint64(0xBF58476D1CE4E5B9)
            key ^= key >> np.uint64(31)
    return key
