"""How big an index is, and which one `--index auto` picks for a corpus and a memory budget.

Pure functions (no FAISS, no I/O), so the choice can be unit-tested at any size
and quoted in docs/INDEX.md. The rules follow autofaiss: exact search while the
corpus is small, IVF-Flat while the raw vectors fit the budget, IVF-SQ8 (4x
smaller) after that, then OPQ + IVF-PQ with the largest code that fits.
"""

from __future__ import annotations

import math
import re

# "Tens of thousands": below this, brute force costs a few ms per query at
# 2048 dims and is exact, so an approximate index buys nothing worth its recall loss.
FLAT_MAX_VECTORS = 50_000
# FAISS warns under 39 training points per centroid; 50 per list gives k-means
# some slack without paying for a bigger sample than the lists need.
TRAIN_POINTS_PER_LIST = 50
MIN_TRAIN_POINTS_PER_LIST = 39
# The training sample lives in RAM next to the index while the quantizer trains.
TRAIN_BYTES_MAX = 1 << 30
# Held-out queries: recall@10 is reported on EVAL, nprobe/efSearch tuned on TUNE.
EVAL_QUERIES_MAX = 1000
TUNE_QUERIES_MAX = 500
PQ_CODE_SIZES = (256, 128, 64, 32, 16, 8)  # bytes per vector, best recall first
HNSW_M = 32
ID_BYTES = 8  # IVF lists store an int64 label beside each code

INDEX_TYPES = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_memory_budget(budget: str | int) -> int:
    """Bytes from `4GB` (10^9), `4GiB`/`4G` (2^30), `512MB`, or a plain number of bytes.

    Raises:
        ValueError: the text is not a positive size.
    """
    if isinstance(budget, int):
        value = budget
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
        unit = found.group(2).lower() if found else None
        if not found or unit not in _UNITS:
            raise ValueError(f"memory budget {budget!r} is not a size; write e.g. 4GB, 512MB, 8GiB or a byte count")
        value = int(float(found.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory budget must be positive; got {budget!r}")
    return value


def eval_queries_for(n: int) -> int:
    """Held-out queries on which recall@10 is reported (never used for training or tuning)."""
    return max(1, min(EVAL_QUERIES_MAX, n // 10))


def tune_queries_for(n: int) -> int:
    """Queries on which nprobe / efSearch are tuned (disjoint from the eval queries)."""
    return max(1, min(TUNE_QUERIES_MAX, n // 10))


def nlist_target(n: int) -> int:
    """Inverted lists a corpus of n vectors wants before the training bound: ~4*sqrt(n)."""
    return max(1, int(4 * math.sqrt(n)))


def train_size_for(n: int, dim: int, nlist: int | None = None) -> int:
    """Vectors in the random training sample: enough for the lists, bounded by RAM and by
    the rows that are not held out as eval queries."""
    lists = nlist if nlist is not None else nlist_target(n)
    available = max(1, n - eval_queries_for(n)) if n > 1 else n
    return max(1, min(available, TRAIN_POINTS_PER_LIST * lists, TRAIN_BYTES_MAX // (4 * dim)))


def nlist_for(n: int, dim: int) -> int:
    """~4*sqrt(n) inverted lists, at most train_size/39 so k-means has enough points per list."""
    return max(1, min(nlist_target(n), train_size_for(n, dim) // MIN_TRAIN_POINTS_PER_LIST))


def pq_shape(dim: int, code_bytes: int) -> tuple[int, int] | None:
    """(M, d_out) of OPQ{M}_{d_out},...,PQ{M}: 4 dims per sub-quantizer after OPQ, as autofaiss does."""
    m = code_bytes
    if m > dim:
        return None
    d_out = min(4 * m, dim - dim % m)
    return m, d_out


def index_bytes(index_type: str, n: int, dim: int, *, nlist: int = 0, pq_m: int = 0) -> int:
    """Approximate RAM (and file size) of an index of n vectors; what the budget is compared with."""
    centroids = nlist * dim * 4
    if index_type == "flat":
        return n * dim * 4
    if index_type == "ivf-flat":
        return n * (dim * 4 + ID_BYTES) + centroids
    if index_type == "ivf-sq8":
        return n * (dim + ID_BYTES) + centroids + 2 * dim * 4
    if index_type == "ivf-pq":
        shape = pq_shape(dim, pq_m)
        d_out = shape[1] if shape else dim
        return n * (pq_m + ID_BYTES) + nlist * d_out * 4 + 256 * d_out * 4 + dim * d_out * 4
    if index_type == "hnsw":
        # level 0 keeps 2*M neighbour ids, upper levels add ~1/M of that again
        return n * (dim * 4 + int(2 * HNSW_M * 4 * 1.1) + 8)
    raise ValueError(f"unknown index type {index_type!r}")


def pq_code_bytes(n: int, dim: int, memory_budget_bytes: int) -> int | None:
    """Largest PQ code (bytes/vector) whose IVF-PQ index fits the budget, or None."""
    nlist = nlist_for(n, dim)
    for m in PQ_CODE_SIZES:
        if pq_shape(dim, m) and index_bytes("ivf-pq", n, dim, nlist=nlist, pq_m=m) <= memory_budget_bytes:
            return m
    return None


def factory_for(index_type: str, n: int, dim: int, memory_budget_bytes: int) -> str:
    """The FAISS factory string of a named index type, sized for n vectors.

    Raises:
        ValueError: unknown type, or ivf-pq with no code size that fits the budget.
    """
    nlist = nlist_for(n, dim)
    if index_type == "flat":
        return "Flat"
    if index_type == "ivf-flat":
        return f"IVF{nlist},Flat"
    if index_type == "ivf-sq8":
        return f"IVF{nlist},SQ8"
    if index_type == "hnsw":
        return f"HNSW{HNSW_M}"
    if index_type == "ivf-pq":
        m = pq_code_bytes(n, dim, memory_budget_bytes)
        if m is None:
            need = index_bytes("ivf-pq", n, dim, nlist=nlist, pq_m=min(PQ_CODE_SIZES))
            raise ValueError(
                f"no IVF-PQ index of {n:,} vectors x {dim} dims fits a memory budget of "
                f"{memory_budget_bytes:,} bytes (the smallest needs ~{need:,}); raise --memory-budget"
            )
        m, d_out = pq_shape(dim, m)  # type: ignore[misc]
        train = train_size_for(n, dim)
        # 8-bit codes need 256 centroids per sub-quantizer: tiny corpora get fewer bits and no OPQ
        # (OPQ trains an 8-bit PQ internally).
        if train >= 1024:
            return f"OPQ{m}_{d_out},IVF{nlist},PQ{m}np"
        nbits = max(1, min(8, int(math.log2(max(2, train // 4)))))
        return f"IVF{nlist},PQ{m}x{nbits}np"
    raise ValueError(f"unknown index type {index_type!r}; expected one of {', '.join(INDEX_TYPES)}")


def choose_index(n: int, dim: int, memory_budget_bytes: int) -> tuple[str, str]:
    """The index `--index auto` builds for n vectors of `dim` floats within a RAM budget.

    Rules, first match wins (the table is in docs/INDEX.md):
    1. n < 50,000 and the raw vectors fit: ("flat", "Flat") - exact search.
    2. IVF-Flat fits (n * (4*dim + 8) bytes + centroids): ("ivf-flat", "IVF{nlist},Flat").
    3. IVF-SQ8 fits (n * (dim + 8) bytes + centroids): ("ivf-sq8", "IVF{nlist},SQ8").
    4. Otherwise OPQ + IVF-PQ with the largest code of 256/128/64/32/16/8 bytes that fits:
       ("ivf-pq", "OPQ{M}_{4M},IVF{nlist},PQ{M}np"); "np": no polysemous training, which takes
       minutes at M=256 and only serves Hamming-filtered search, which we don't use.
    nlist = min(4*sqrt(n), train_size // 39), train_size = min(n - held-out, 50*4*sqrt(n), 1 GiB of vectors).

    Args:
        n: number of vectors to index (>= 1).
        dim: vector dimension.
        memory_budget_bytes: RAM the finished index may use (the same as its file size, roughly).

    Returns:
        (index_type, FAISS factory string).

    Raises:
        ValueError: n or dim < 1, or not even the smallest IVF-PQ fits the budget.
    """
    if n < 1 or dim < 1:
        raise ValueError(f"need at least one vector of at least one dimension; got n={n}, dim={dim}")
    nlist = nlist_for(n, dim)
    if n < FLAT_MAX_VECTORS and index_bytes("flat", n, dim) <= memory_budget_bytes:
        return "flat", factory_for("flat", n, dim, memory_budget_bytes)
    for index_type in ("ivf-flat", "ivf-sq8"):
        if index_bytes(index_type, n, dim, nlist=nlist) <= memory_budget_bytes:
            return index_type, factory_for(index_type, n, dim, memory_budget_bytes)
    return "ivf-pq", factory_for("ivf-pq", n, dim, memory_budget_bytes)
