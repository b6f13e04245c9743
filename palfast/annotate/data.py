"""The images people look at, addressed by index only, and the embeddings queries are chosen on.

A data set is one of

* a folder of images: ImageFolder-style (``root/<class>/<image>``) or flat (``root/<image>``),
  every image file under ``root`` in sorted relative-path order (sample id = position);
* an ``.npy`` array of images ``[N, H, W]`` or ``[N, H, W, C]`` (C = 1, 3 or 4), or an ``.npz``
  holding one under the key ``images`` (or as its only array);
* ``demo``: scikit-learn's digits (1,797 8x8 images), rendered to PNG.

Sample ids are positions, so the answer store and a trainer agree on them as long as they
enumerate the data set the same way (:func:`load_data` is the enumeration to use).

Embeddings: a ``[N, D]`` ``.npy`` file of float16, float32 or float64, opened memory-mapped
(``np.load(path, mmap_mode="r")``: a pool of a million rows is read from the page cache, never
copied whole) and re-read whenever its modification time changes. A trainer refreshes it by
writing a temporary file and ``os.replace``-ing it over the old one: the map already open
keeps the old file's contents until the next read, and a half-written file is never read.
Rewriting the file in place (``np.save`` on the same path) truncates the file under the live
map: a read of the truncated pages kills the server (SIGBUS) or shows half-written rows.
Without a file: the images downscaled to ``SIMPLE_SIDE`` pixels a side, grey, flattened, a
crude but useful similarity for digits and the like.
"""

from __future__ import annotations

import io
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

#: Image files a folder data set is made of (lower-case suffixes).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
#: Side of the grey thumbnail used as the embedding when none is given: 16×16 = 256
#: numbers keep the k-NN search cheap and still separate digits-like images.
SIMPLE_SIDE = 16
#: Images are shown at least this many pixels a side: the digits are 8×8, far too small
#: to judge; upscaled with nearest neighbour so no detail is invented.
MIN_DISPLAY_SIDE = 128
#: Larger images are shrunk to this many pixels a side: enough to judge "alike" on a
#: screen showing up to 7 images, and a photo folder does not send megabytes per question.
MAX_DISPLAY_SIDE = 512
#: Rendered PNGs kept in memory (a captcha screen shows up to ~10, many people share them).
PNG_CACHE = 4096
#: An embeddings file that failed its checks is read again when its modification time or
#: size changes, or after this many seconds: checking a million rows for NaN takes a
#: fraction of a second, too much for every question, while a file system's clock tick
#: may hide a last write within the same tick.
BAD_FILE_RETRY_S = 5.0


def _need_pillow():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            "palfast annotate needs Pillow to read and render images: pip install 'palfast[annotate]'"
        ) from e
    return Image


def _to_uint8(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        pass
    elif images.ndim == 3:
        images = images[..., None]
    else:
        raise ValueError(
            f"palfast annotate: {name} must hold images [N, H, W] or [N, H, W, C] "
            f"with C in 1, 3, 4, got shape {images.shape}"
        )
    if images.shape[0] < 2:
        raise ValueError(f"palfast annotate: {name} must hold at least 2 images, got {images.shape[0]}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.number) or np.issubdtype(images.dtype, np.complexfloating):
        raise ValueError(f"palfast annotate: {name} must hold numbers, got dtype {images.dtype}")
    x = images.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"palfast annotate: {name} holds NaN or infinite pixels")
    lo, hi = float(x.min()), float(x.max())
    # Floats in [0, 1] are the usual convention; anything else is stretched to 0..255.
    if lo >= 0 and hi <= 1:
        x = x * 255
    elif hi > lo:
        x = (x - lo) * (255 / (hi - lo))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class ImageData:
    """``n`` images; :meth:`png` renders image ``i`` (0 ≤ i < n) for the browser."""

    def __init__(self, name: str, *, array: np.ndarray | None = None, files: list[Path] | None = None):
        self.name = name
        self._array = array
        self._files = files
        self.n = len(files) if files is not None else int(array.shape[0])
        self.png = lru_cache(maxsize=PNG_CACHE)(self._render)

    def pixels(self, i: int):
        """Image ``i`` as a PIL image (the only way a file is opened: by index)."""
        Image = _need_pillow()
        if self._files is not None:
            with Image.open(self._files[i]) as im:
                return im.convert("RGB")
        a = self._array[i]
        return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)

    def _render(self, i: int) -> bytes:
        Image = _need_pillow()
        im = self.pixels(i)
        side = max(im.size)
        if side < MIN_DISPLAY_SIDE:
            scale = -(-MIN_DISPLAY_SIDE // side)
            im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST)
        elif side > MAX_DISPLAY_SIDE:
            im.thumbnail((MAX_DISPLAY_SIDE, MAX_DISPLAY_SIDE))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def simple_embeddings(self) -> np.ndarray:
        """``[n, SIMPLE_SIDE²]`` float32: grey thumbnails, centred per image."""
        Image = _need_pillow()
        out = np.empty((self.n, SIMPLE_SIDE * SIMPLE_SIDE), dtype=np.float32)
        for i in range(self.n):
            im = self.pixels(i).convert("L").resize((SIMPLE_SIDE, SIMPLE_SIDE), Image.BILINEAR)
            out[i] = np.asarray(im, dtype=np.float32).reshape(-1) / 255
        return out - out.mean(axis=1, keepdims=True)


def demo_data() -> ImageData:
    """scikit-learn's digits (bundled with scikit-learn, no download), dark ink on white."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "palfast annotate --demo needs scikit-learn for its digits: pip install 'palfast[annotate]'"
        ) from e
    x = load_digits().images  # [1797, 8, 8], 0..16, 16 = ink
    return ImageData("digits (scikit-learn)", array=np.rint(255 - x * (255 / 16)).astype(np.uint8))


def load_data(path: str | os.PathLike) -> ImageData:
    """A folder of images, an ``.npy`` array or an ``.npz`` (module docstring)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(
            (f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda f: f.relative_to(p).as_posix(),
        )
        if len(files) < 2:
            raise ValueError(
                f"palfast annotate: {str(p)!r} holds {len(files)} image files "
                f"({', '.join(IMAGE_SUFFIXES)}); at least 2 are needed"
            )
        return ImageData(p.name, files=files)
    if not p.exists():
        raise FileNotFoundError(
            f"palfast annotate: --data {str(p)!r} does not exist (give a folder of images, an .npy or an .npz file)"
        )
    if p.suffix == ".npy":
        return ImageData(p.name, array=_to_uint8(np.load(p, allow_pickle=False), str(p)))
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            if "images" in keys:
                key = "images"
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise ValueError(
                    f"palfast annotate: {str(p)!r} holds arrays {keys}; name the "
                    "images 'images' (np.savez(path, images=...))"
                )
            return ImageData(p.name, array=_to_uint8(z[key], f"{p}[{key!r}]"))
    raise ValueError(f"palfast annotate: --data {str(p)!r} is neither a folder, an .npy nor an .npz")


#: Said after a reload's error while older embeddings are still in use.
_KEPT = " (the previous embeddings stay in use until the file is fixed)"


class Embeddings:
    """The embeddings queries are chosen on, re-read from ``path`` when its mtime changes.

    ``get()`` returns ``(array [n, D], version)``: the file memory-mapped read-only (float16,
    float32 or float64 as written), or until ``path`` exists (a trainer that has not written
    it yet) the ``fallback`` embeddings as float32. The version changes with every
    successful reload, so the question queue knows to rebuild itself. A file that cannot be
    read (half written, wrong shape, dtype or a NaN) keeps the previous embeddings and is
    retried later; ``error`` says why, for the page to show. A file given at start must be
    right: the constructor raises ValueError naming ``--embeddings``.
    """

    def __init__(self, n: int, path: str | os.PathLike | None = None, fallback=None):
        self.n = n
        self.path = None if path is None else Path(path)
        self.version = 0
        self.error: str | None = None
        self._mtime: int | None = None
        self._failed: tuple[int, int, float] | None = None  # (mtime, size, when) of a bad file
        self._array: np.ndarray | None = None
        if fallback is not None:
            self._array = np.asarray(fallback, dtype=np.float32)
        if self.path is not None and self.path.exists():
            # A file given at start must be right: better to say so now than serve odd pairs.
            if not self.poll():
                raise ValueError(self.error.removesuffix(_KEPT))
        # A file that does not exist yet (the trainer has not written it): the fallback
        # until it appears.

    def _read(self) -> np.ndarray:
        """The file, memory-mapped and checked (shape, float dtype, no NaN/Inf) a chunk at a
        time (:func:`palfast.knn.as_rows`): nothing of its size is allocated."""
        from ..knn import as_rows

        name = f"--embeddings {str(self.path)!r}"
        x = np.load(self.path, mmap_mode="r", allow_pickle=False)
        if x.ndim != 2 or x.shape[0] != self.n:
            raise ValueError(
                f"palfast annotate: {name} must be [N, D] with N = {self.n} (one row per image), got shape {x.shape}"
            )
        as_rows("palfast annotate", name, x, min_rows=1, finite=True)
        return x

    def poll(self) -> bool:
        """Reload if the file changed; True when new embeddings were loaded."""
        if self.path is None:
            return False
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.error = (
                f"palfast annotate: waiting for the embeddings file {str(self.path)!r} "
                "(a trainer writes it); questions use the previous embeddings meanwhile"
            )
            return False
        except OSError as e:
            self.error = f"palfast annotate: cannot read embeddings {str(self.path)!r}: {e}"
            return False
        mtime = st.st_mtime_ns
        if mtime == self._mtime:
            return False
        if (
            self._failed is not None
            and self._failed[:2] == (mtime, st.st_size)
            and time.monotonic() - self._failed[2] < BAD_FILE_RETRY_S
        ):
            return False  # the same bad file: self.error still says why
        try:
            x = self._read()
        except Exception as e:  # a trainer mid-write, or a wrong file: keep what we have
            self._failed = (mtime, st.st_size, time.monotonic())
            self.error = (
                str(e)
                if str(e).startswith("palfast")
                else f"palfast annotate: cannot read --embeddings {str(self.path)!r}: {e}"
            )
            if self._array is not None:
                self.error += _KEPT
            return False
        self._mtime, self._array, self.error, self._failed = mtime, x, None, None
        self.version += 1
        return True

    def get(self):
        return self._array, self.version
