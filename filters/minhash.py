"""Text normalisation, word shingles, MinHash signatures, LSH band keys and Jaccard estimates (pure, no I/O).

Signatures are `num_perm` uint32 values: each shingle is hashed to 32 bits (words by blake2b, stable across
processes and machines, combined per n-gram by a vectorised multiply-add), then permuted by `(a * x + b) mod (2**61 - 1)` with 32-bit `a`, `b` (no uint64 overflow) and the
minimum per permutation is kept. Two signatures agree at one position with probability = Jaccard similarity
of the shingle sets, so the fraction of equal positions estimates it.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from functools import lru_cache

import numpy as np

MERSENNE = np.uint64((1 << 61) - 1)
MASK32 = np.uint64(0xFFFFFFFF)
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_CHUNK = 4096  # shingles per vectorised block (bounds memory on very long documents)


def normalize_text(text: str) -> str:
    """NFKC, case-folded (ß = ss), punctuation and symbols to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def text_hash(normalized: str) -> str:
    """Stable 128-bit hex digest of an already normalised text (exact-duplicate key)."""
    return hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def shingles(normalized: str, n: int = 5) -> set[str]:
    """Word n-grams of a normalised text; a text shorter than n words is one shingle; empty text none."""
    words = normalized.split()
    if not words:
        return set()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) coefficients of `num_perm` hash permutations, fixed by `seed`."""
    rng = np.random.RandomState(seed)
    a = rng.randint(1, 1 << 32, size=num_perm, dtype=np.uint64)
    b = rng.randint(0, 1 << 32, size=num_perm, dtype=np.uint64)
    return a, b


def _word_hashes(words: list[str]) -> np.ndarray:
    """64-bit blake2b of each word (each distinct word hashed once)."""
    cache: dict[str, int] = {}
    out = np.empty(len(words), dtype=np.uint64)
    for i, word in enumerate(words):
        h = cache.get(word)
        if h is None:
            h = cache[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        out[i] = h
    return out


@lru_cache(maxsize=16)
def _position_multipliers(n: int) -> np.ndarray:
    """Odd 64-bit multipliers, one per word position of a shingle (fixed: shingle hashes never change)."""
    rng = np.random.RandomState(0x5EED)
    return rng.randint(0, 1 << 62, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def shingle_hashes(normalized: str, n: int = 5) -> np.ndarray:
    """Distinct 32-bit hashes of the word n-grams of a normalised text (the same set `shingles` returns, hashed):
    word hashes combined by multiply-add over positions (wrapping uint64), top 32 bits kept. Vectorised."""
    words = normalized.split()
    if not words:
        return np.empty(0, dtype=np.uint64)
    w = _word_hashes(words)
    n = min(n, len(words))
    m = len(w) - n + 1
    mult = _position_multipliers(n)
    acc = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        acc += w[k:k + m] * mult[k]  # wraps modulo 2**64
    return np.unique(acc >> np.uint64(32))


def signature(shingle_set: set[str], num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """MinHash signature of a set of shingle strings (same values as `text_signature` on the text)."""
    hashed = np.unique(np.concatenate([shingle_hashes(s, len(s.split())) for s in shingle_set])) if shingle_set else \
        np.empty(0, dtype=np.uint64)
    return signature_from_hashes(hashed, num_perm, seed)


def signature_from_hashes(hashed: np.ndarray, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """MinHash signature (uint32[num_perm]) of 32-bit shingle hashes; all 0xFFFFFFFF when there are none."""
    sig = np.full(num_perm, 0xFFFFFFFF, dtype=np.uint64)
    if not len(hashed):
        return sig.astype(np.uint32)
    a, b = permutations(num_perm, seed)
    for start in range(0, len(hashed), _CHUNK):
        x = hashed[start:start + _CHUNK, None]
        values = ((x * a + b) % MERSENNE) & MASK32  # a, b, x < 2**32: a*x + b < 2**64, no overflow
        np.minimum(sig, values.min(axis=0), out=sig)
    return sig.astype(np.uint32)


def text_signature(text: str, ngram: int = 5, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    return signature_from_hashes(shingle_hashes(normalize_text(text), ngram), num_perm, seed)


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity of two sets (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal signature positions: an unbiased estimate of the Jaccard similarity."""
    if len(sig_a) != len(sig_b):
        raise ValueError(f"signatures differ in length: {len(sig_a)} vs {len(sig_b)}")
    return float(np.count_nonzero(sig_a == sig_b)) / len(sig_a)


def low_bytes(sig: np.ndarray) -> bytes:
    """The lowest 8 bits of each signature value (b-bit minwise hashing, Li & Koenig 2010): a quarter of the
    bytes, for comparing signatures with `low_byte_estimates`."""
    return np.ascontiguousarray(sig, dtype=np.uint32).astype(np.uint8).tobytes()


def low_byte_estimates(sigs: np.ndarray, one: np.ndarray) -> np.ndarray:
    """Jaccard estimates of rows of `sigs` against `one` from their low bytes (uint8 arrays): two unequal minhash
    values still agree on 8 bits 1/256 of the time, so the matching fraction m estimates J + (1 - J) / 256 and
    J = (m - 1/256) / (1 - 1/256) (the b-bit estimator for a large hash universe), clipped at 0."""
    matching = np.count_nonzero(sigs == one, axis=-1) / sigs.shape[-1]
    return np.clip((matching - 1 / 256) / (1 - 1 / 256), 0.0, 1.0)


def _integrate(f, lo: float, hi: float, steps: int = 200) -> float:
    x = np.linspace(lo, hi, steps)
    return float(np.trapezoid(f(x), x))


def collision_probability(jaccard_value, bands: int, rows: int):
    """Probability that two documents with this Jaccard similarity share at least one LSH band."""
    return 1.0 - (1.0 - np.asarray(jaccard_value, dtype=float) ** rows) ** bands


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted false-positive and false-negative
    areas under the band-collision curve around `threshold`."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = _integrate(lambda s: collision_probability(s, bands, rows), 0.0, threshold)
            fn = _integrate(lambda s: 1.0 - collision_probability(s, bands, rows), threshold, 1.0)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[str]:
    """One key per band: band index + digest of that band's rows. Equal keys = a candidate pair."""
    if bands * rows > len(sig):
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} values, signature has {len(sig)}")
    sig = np.ascontiguousarray(sig, dtype=np.uint32)
    return [f"{b:03d}:" + hashlib.blake2b(sig[b * rows:(b + 1) * rows].tobytes(), digest_size=12).hexdigest()
            for b in range(bands)]
