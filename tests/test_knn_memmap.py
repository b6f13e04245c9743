"""Embeddings larger than RAM: palfast.knn, candidate_pairs and select_queries read a
memory-mapped .npy, an np.memmap or a torch.from_file tensor in chunks, give the
in-RAM tensor's results, and hold no float32 copy of the whole file beyond the index."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import palfast
from palfast import knn as knn_mod
from palfast.active import RelationStore, candidate_pairs, select_queries
from palfast.knn import knn

from _store_helpers import child_env

try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False


def _peak_growth(tmp_path, script: str, *args: str) -> int:
    """What ``python -c script *args`` prints last: the bytes by which its peak RSS grew
    (a child process of the palfast these tests import, in ``tmp_path``: child_env)."""
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


#: A chunk of 4 KiB is 85 rows at D = 12: the tests' 300 rows span 4 chunks, the last
#: one partial, so every chunked pass crosses chunk boundaries.
SMALL_CHUNK_BYTES = 1 << 12
SEARCHES = [("torch", "exact")] + ([("faiss", "exact"), ("faiss", "ivf")] if HAVE_FAISS else [])


def clustered(n=300, d=12, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((classes, d))[rng.integers(0, classes, n)] + 0.5 * rng.standard_normal((n, d))


def maps(tmp_path: Path, x: np.ndarray) -> dict:
    """The three ways of handing palfast a file too large for RAM, over the same rows."""
    np.save(tmp_path / "x.npy", x)
    x.tofile(tmp_path / "x.bin")
    n, d = x.shape
    return {
        "npy": np.load(tmp_path / "x.npy", mmap_mode="r"),
        "memmap": np.memmap(tmp_path / "x.bin", dtype=x.dtype, mode="r", shape=(n, d)),
        "from_file": torch.from_file(str(tmp_path / "x.bin"), shared=False, size=n * d, dtype=torch.float64).view(n, d),
    }


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(knn_mod, "CHUNK_BYTES", SMALL_CHUNK_BYTES)


@pytest.mark.parametrize("backend,index", SEARCHES)
def test_knn_on_memory_maps_equals_in_ram(tmp_path, small_chunks, backend, index):
    x = clustered()
    want = knn(torch.from_numpy(x), 5, backend=backend, index=index)
    want_keys = knn(torch.from_numpy(x[:40]), 7, keys=torch.from_numpy(x), backend=backend, index=index)
    for kind, m in maps(tmp_path, x).items():
        got = knn(m, 5, backend=backend, index=index)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kind
        got = knn(torch.from_numpy(x[:40]), 7, keys=m, backend=backend, index=index)
        assert torch.equal(got[0], want_keys[0]) and torch.equal(got[1], want_keys[1]), kind


def test_chunked_exact_search_equals_one_chunk(tmp_path, monkeypatch):
    x = clustered()
    whole = knn(torch.from_numpy(x), 5, backend="torch")
    monkeypatch.setattr(knn_mod, "CHUNK_BYTES", SMALL_CHUNK_BYTES)
    chunked = knn(maps(tmp_path, x)["npy"], 5, backend="torch")
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


@pytest.mark.slow
def test_candidate_pairs_and_select_queries_on_memory_maps(tmp_path, small_chunks, monkeypatch):
    x = clustered()
    t = torch.from_numpy(x)
    store = RelationStore()
    store.record(torch.tensor([[0, 1], [2, 3]]), torch.tensor([True, False]))
    want = candidate_pairs(t, k=4, store=store, backend="torch")
    # "pal" on the k-NN graph (the path of large pools) reads rows a few at a time.
    monkeypatch.setattr(palfast.active.strategies, "PAL_EXACT_WORK", 1)
    want_q = {s: select_queries(t, store, 20, s, backend="torch") for s in ("pal", "nearest", "uncertain")}
    for kind, m in maps(tmp_path, x).items():
        got = candidate_pairs(m, k=4, store=store, backend="torch")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kind
        for strategy, q in want_q.items():
            assert torch.equal(select_queries(m, store, 20, strategy, backend="torch"), q), (kind, strategy)


def test_bad_memory_maps_name_the_argument(tmp_path):
    x = clustered(n=20, d=4)
    x.tofile(tmp_path / "x.bin")
    flat = np.memmap(tmp_path / "x.bin", dtype=np.float64, mode="r")  # shape forgotten
    with pytest.raises(
        ValueError,
        match=r"palfast.active.candidate_pairs: embeddings must be a "
        r"2-D memory map \[N, D\], got shape \(80,\).*shape=",
    ):
        candidate_pairs(flat, k=2)
    ints = np.memmap(tmp_path / "x.bin", dtype=np.int64, mode="r", shape=(20, 4))
    with pytest.raises(
        TypeError,
        match=r"palfast.knn.knn: keys must be a memory map of "
        r"native-endian float16, float32, float64, got dtype",
    ):
        knn(torch.zeros(2, 4), 1, keys=ints)
    swapped = np.memmap(tmp_path / "x.bin", dtype=">f8", mode="r", shape=(20, 4))
    with pytest.raises(
        TypeError,
        match=r"select_queries: embeddings must be a memory map of "
        r"native-endian.*'>f8'",
    ):
        select_queries(swapped, RelationStore(), 2)
    mm = np.load(_saved(tmp_path, x), mmap_mode="r")
    with pytest.raises(ValueError, match="embeddings must have non-negative strides"):
        candidate_pairs(mm[::-1], k=2)
    with pytest.raises(ValueError, match="keys must have the queries' width D = 3"):
        knn(torch.zeros(2, 3), 1, keys=mm)
    with pytest.raises(
        TypeError,
        match=r"embeddings must be a torch.Tensor or a NumPy array "
        r"\(for a file larger than RAM: np.load\(path, "
        r"mmap_mode='r'\)\), got list",
    ):
        candidate_pairs(x.tolist(), k=2)
    bad = x.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="embeddings must be finite, got 1 rows with NaN"):
        candidate_pairs(np.load(_saved(tmp_path, bad), mmap_mode="r"), k=2)


def _saved(tmp_path, x):
    path = tmp_path / f"saved{len(os.listdir(tmp_path))}.npy"
    np.save(path, x)
    return path


#: The peak-memory check: 250 000 × 64 float64 rows (122 MiB on disk; the float32 index
#: is 61 MiB), 64 queries. Rows read from the map count in RSS as file pages, so the
#: bound is file + index + slack; unit_rows used to make three float32 copies of the
#: whole array at once (61 MiB each), more than the slack.
MEM_ROWS, MEM_DIM = 250_000, 64
#: Pages touched besides the file and the index: allocator arenas, one chunk, the
#: similarity blocks (both made small in the child), the results. They measured 14 MiB
#: in a quiet child and up to 71 MiB under pytest on a loaded 2-core machine; the code
#: before chunked reads peaked at 308 MiB here, above file + index + this slack (279).
MEM_SLACK = 96 << 20

_MEM_CHILD = textwrap.dedent("""
    import sys, numpy as np, torch
    import palfast.knn as K
    K.CHUNK_BYTES = 1 << 22   # 4 MiB chunks and similarity blocks: small beside the slack
    K.MAX_BLOCK = 1 << 20
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    path, kind, backend = sys.argv[1:]
    x = (np.load(path, mmap_mode="r") if kind == "npy" else
         torch.from_file(path, shared=False, size={n} * {d}, dtype=torch.float64).view({n}, {d}))
    q = torch.randn(64, {d}, dtype=torch.float64)
    K.knn(q, 10, keys=torch.randn(1000, {d}, dtype=torch.float64), backend=backend)  # warm up
    open("/proc/self/clear_refs", "w").write("5")   # peak RSS := current RSS
    before = status("VmRSS")
    K.knn(q, 10, keys=x, backend=backend)
    print(status("VmHWM") - before)
""").format(n=MEM_ROWS, d=MEM_DIM)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize(
    "kind,backend",
    [
        ("from_file", "torch"),  # the fast loop runs one: a child process, a 122 MiB file
        pytest.param("npy", "torch", marks=pytest.mark.slow),
        *([pytest.param("npy", "faiss", marks=pytest.mark.slow)] if HAVE_FAISS else []),
    ],
)
@pytest.mark.slow
def test_peak_memory_is_the_file_and_the_index(tmp_path, kind, backend):
    x = np.random.default_rng(0).standard_normal((MEM_ROWS, MEM_DIM))
    path = tmp_path / ("x.npy" if kind == "npy" else "x.bin")
    np.save(path, x) if kind == "npy" else x.tofile(path)
    del x
    extra = _peak_growth(tmp_path, _MEM_CHILD, str(path), kind, backend)
    file_bytes, index_bytes = MEM_ROWS * MEM_DIM * 8, MEM_ROWS * MEM_DIM * 4
    assert extra <= file_bytes + index_bytes + MEM_SLACK, (
        f"{extra / 2**20:.0f} MiB over {(file_bytes + index_bytes) / 2**20:.0f} MiB (file + index)"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_rows_are_counted_across_chunks(dtype):
    from palfast._checks import count_nonfinite_rows

    x = torch.randn(50, 6).to(dtype)
    x[0, 5], x[17, 1], x[17, 2], x[49, 0] = float("nan"), float("inf"), float("-inf"), float("nan")
    for view in (x, x[:, ::2], x.T.contiguous().T):  # strided views too
        want = int((~torch.isfinite(view)).any(1).sum())
        for rows in (None, 1, 7, 50):  # chunk edges inside the bad rows' neighbourhood
            assert count_nonfinite_rows(view, rows) == want
    assert count_nonfinite_rows(x[1:17]) == 0 and count_nonfinite_rows(x[:0]) == 0
    with pytest.raises(ValueError, match=r"op: x must be finite, got 3 rows with NaN or Inf"):
        knn_mod.as_rows("op", "x", x, finite=True)


#: The NaN/Inf scan's memory check: a 256 MiB float32 tensor, whose whole bool mask
#: (what torch.isfinite(x) made) is 64 MiB; scanned a chunk at a time (32 MiB of rows,
#: an 8 MiB mask, two while a bad chunk's rows are counted) the peak stays far below.
SCAN_ROWS, SCAN_DIM = 1 << 14, 1 << 12
SCAN_SLACK = 32 << 20

_SCAN_CHILD = textwrap.dedent("""
    import sys, torch
    from palfast._checks import check_tensor
    from palfast.knn import as_rows
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    x = torch.ones({n}, {d})
    x[-1, -1] = float("nan")
    check = check_tensor if sys.argv[1] == "check_tensor" else as_rows
    open("/proc/self/clear_refs", "w").write("5")   # peak RSS := current RSS
    before = status("VmRSS")
    try:
        check("op", "x", x, finite=True)
    except ValueError as e:
        assert "got 1 rows with NaN or Inf" in str(e), e
    print(status("VmHWM") - before)
""").format(n=SCAN_ROWS, d=SCAN_DIM)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("check", ["check_tensor", "as_rows"])
@pytest.mark.slow
def test_the_nonfinite_scan_holds_one_chunk_not_a_mask_of_the_whole(tmp_path, check):
    extra = _peak_growth(tmp_path, _SCAN_CHILD, check)
    assert extra <= SCAN_SLACK, f"{extra / 2**20:.0f} MiB to scan a {SCAN_ROWS * SCAN_DIM * 4 >> 20} MiB tensor"
