"""A small C kernel for the CPU path: lazy AdamW on fp32 tables, in place.

``peer_lazy_adamw`` reads and writes each listed row of the parameter and of both
moments once, in place, and reads the gradient row once. Nothing is gathered or
scattered (:mod:`peer_ll.kernels.lazy_adamw`). Touched rows lie far apart in a large
pool, so it prefetches a few rows ahead: no hardware prefetcher can guess them.
The source is compiled with the system C compiler on first use (well under a second)
into a per-user cache, like Triton's kernel cache, and called through ``ctypes``,
which releases the GIL; work is split over ``torch.get_num_threads()`` POSIX threads.
Where no compiler is found or the build fails, :func:`load` returns None and callers
use their pure-torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

typedef struct {
  float *p; void *m, *v; const float *g; const int64_t *rows;
  int64_t begin, end, width, g_by_row, m_bytes;
  float decay, beta1, c1, beta2, c2, step_size, bc2_sqrt, eps;
} job_t;

static inline float bf16_load(const uint16_t *x) {
  uint32_t u = (uint32_t)(*x) << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline void bf16_store(uint16_t *x, float f) {  /* round to nearest even */
  uint32_t u; memcpy(&u, &f, 4);
  if (isnan(f)) { *x = 0x7fc0; return; }
  u += 0x7fffu + ((u >> 16) & 1u); *x = (uint16_t)(u >> 16);
}

#define PREFETCH 4
/* Rows lie far apart: fetch a later row's lines ahead of use, as no prefetcher can guess. */
static inline void prefetch_row(const job_t *j, int64_t r, int64_t i) {
  int64_t mb = j->m_bytes, n = j->width * 4;
  const char *p = (const char *)(j->p + r * j->width);
  const char *g = (const char *)(j->g + (j->g_by_row ? r : i) * j->width);
  const char *m = (const char *)j->m + r * j->width * mb;
  const char *v = (const char *)j->v + r * j->width * mb;
  for (int64_t b = 0; b < n; b += 64) {
    __builtin_prefetch(p + b, 1); __builtin_prefetch(g + b, 0);
    if (b < j->width * mb) { __builtin_prefetch(m + b, 1); __builtin_prefetch(v + b, 1); }
  }
}

#define ROW_LOOP(LOAD_M, LOAD_V, STORE_M, STORE_V)                                   \
  for (int64_t i = j->begin; i < j->end; i++) {                                      \
    int64_t r = j->rows[i];                                                          \
    float *p = j->p + r * j->width;                                                  \
    const float *g = j->g + (j->g_by_row ? r : i) * j->width;                        \
    int64_t base = r * j->width;                                                     \
    if (i + PREFETCH < j->end) prefetch_row(j, j->rows[i + PREFETCH], i + PREFETCH);   \
    for (int64_t c = 0; c < j->width; c++) {                                         \
      float gc = g[c];                                                               \
      float m = LOAD_M(base + c) * j->beta1 + gc * j->c1;                            \
      float v = LOAD_V(base + c) * j->beta2 + gc * gc * j->c2;                       \
      STORE_M(base + c, m); STORE_V(base + c, v);                                    \
      float denom = sqrtf(v) / j->bc2_sqrt + j->eps;                                 \
      p[c] = p[c] * j->decay - j->step_size * m / denom;                             \
    }                                                                                \
  }

#define F32_M(k) (((float *)j->m)[k])
#define F32_V(k) (((float *)j->v)[k])
#define F32_SM(k, x) (((float *)j->m)[k] = (x))
#define F32_SV(k, x) (((float *)j->v)[k] = (x))
#define B16_M(k) bf16_load((uint16_t *)j->m + (k))
#define B16_V(k) bf16_load((uint16_t *)j->v + (k))
#define B16_SM(k, x) bf16_store((uint16_t *)j->m + (k), (x))
#define B16_SV(k, x) bf16_store((uint16_t *)j->v + (k), (x))

static void *run_f32(void *arg) {
  job_t *j = (job_t *)arg; ROW_LOOP(F32_M, F32_V, F32_SM, F32_SV) return 0;
}
static void *run_b16(void *arg) {
  job_t *j = (job_t *)arg; ROW_LOOP(B16_M, B16_V, B16_SM, B16_SV) return 0;
}

/* ---------------------------------------------------------------- lazy AdamW */
int peer_lazy_adamw(float *p, void *m, void *v, const float *g, const int64_t *rows,
                    int64_t n_rows, int64_t width, int64_t g_by_row, int64_t bf16_moments,
                    int64_t threads, double lr, double beta1, double beta2, double eps,
                    double weight_decay, double step) {
  job_t jobs[64]; pthread_t ids[64];
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  if (threads > n_rows / 1024) threads = n_rows / 1024 > 0 ? n_rows / 1024 : 1;
  double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
  void *(*fn)(void *) = bf16_moments ? run_b16 : run_f32;
  for (int64_t t = 0; t < threads; t++) {
    job_t *j = &jobs[t];
    j->p = p; j->m = m; j->v = v; j->g = g; j->rows = rows;
    j->begin = n_rows * t / threads; j->end = n_rows * (t + 1) / threads;
    j->width = width; j->g_by_row = g_by_row; j->m_bytes = bf16_moments ? 2 : 4;
    j->decay = (float)(1.0 - lr * weight_decay);
    j->beta1 = (float)beta1; j->c1 = (float)(1.0 - beta1);
    j->beta2 = (float)beta2; j->c2 = (float)(1.0 - beta2);
    j->step_size = (float)(lr / bc1); j->bc2_sqrt = (float)sqrt(bc2); j->eps = (float)eps;
  }
  int64_t started = 1;
  for (int64_t t = 1; t < threads; t++, started++)
    if (pthread_create(&ids[t], 0, fn, &jobs[t])) break;
  fn(&jobs[0]);
  for (int64_t t = started; t < threads; t++) fn(&jobs[t]);  /* threads that failed to start */
  for (int64_t t = 1; t < started; t++) pthread_join(ids[t], 0);
  return 0;
}
"""

_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off", "-pthread"]


def _cache_dir() -> Path:
    root = os.environ.get("PEER_LL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "peer_ll"
    )
    return Path(root)


def _build(compiler: str, source: str = _SOURCE) -> Path:
    """Compile ``source`` into the cache (atomically) and return the library's path."""
    key = hashlib.sha256(
        (source + compiler + " ".join(_FLAGS) + platform.machine() + sys.platform).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
        src.write_text(source)
        subprocess.run(
            [compiler, *_FLAGS, str(src), "-o", str(lib), "-lm"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        os.replace(lib, target)
    return target


def build_and_load(source: str):
    """Compile C ``source`` (cached) and load it with ``ctypes``; None where that fails.

    Set ``PEER_LL_NATIVE=0`` to never build native kernels (pure-torch paths are used).
    """
    if os.environ.get("PEER_LL_NATIVE", "1") == "0" or sys.platform == "win32":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: using the pure-torch kernels")
        return None
    try:
        return ctypes.CDLL(str(_build(compiler, source)))
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("building a native kernel failed (%s); using pure torch", err)
        return None


@functools.cache
def load():
    """The compiled lazy AdamW library (``ctypes.CDLL``), or None where it cannot be built.

    Set ``PEER_LL_NATIVE=0`` to never build it (the pure-torch path is then used).
    """
    lib = build_and_load(_SOURCE)
    if lib is None:
        return None
    i64, f64, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    lib.peer_lazy_adamw.argtypes = [ptr] * 5 + [i64] * 5 + [f64] * 6
    lib.peer_lazy_adamw.restype = ctypes.c_int
    return lib
