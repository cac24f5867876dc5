"""Row-wise top-k on CPU in C: the per-half step of product-key retrieval.

``torch.topk`` over the (T·H, R) sub-key scores of each half was a large share of the
CPU step (a general selection per row). Here each row keeps its k best in a sorted
array: an element replaces the current k-th best only when it beats it, which after
the first few hundred elements is rare, so a row costs about one comparison per
element. Rows are split over ``torch.get_num_threads()`` POSIX threads. The source is
built on first use like the lazy AdamW kernel (:mod:`peer_ll.kernels._native`).

Equal scores keep the lower index first. NaN ranks above every number, as in
``torch.topk`` (a NaN input then retrieves real experts, whose gates are NaN).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from peer_ll.kernels import _native

_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>

/* s ranks above w: torch.topk's order, where NaN ranks above every number. */
static inline int beats(float s, float w) { return s != s ? w == w : s > w; }

typedef struct {
  const float *x; float *vals; int64_t *ids;
  int64_t begin, end, n, stride, k;
} topk_t;

static void *run(void *arg) {
  topk_t *j = (topk_t *)arg;
  int64_t k = j->k, n = j->n;
  for (int64_t r = j->begin; r < j->end; r++) {
    const float *x = j->x + r * j->stride;
    float *v = j->vals + r * k;
    int64_t *id = j->ids + r * k, filled = 0;
    float worst = -INFINITY;
    for (int64_t c = 0; c < n; c++) {
      float s = x[c];
      if (filled == k && !beats(s, worst)) continue;
      int64_t p = filled < k ? filled++ : k - 1;
      while (p > 0 && beats(s, v[p - 1])) { v[p] = v[p - 1]; id[p] = id[p - 1]; p--; }
      v[p] = s; id[p] = c;
      worst = v[filled - 1];
    }
    for (int64_t p = filled; p < k; p++) { v[p] = -INFINITY; id[p] = -1; }
  }
  return 0;
}

int peer_row_topk(const float *x, float *vals, int64_t *ids, int64_t rows, int64_t n,
                  int64_t stride, int64_t k, int64_t threads) {
  topk_t jobs[64]; pthread_t tids[64];
  if (threads > rows / 64) threads = rows / 64;
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  for (int64_t t = 0; t < threads; t++) {
    topk_t *j = &jobs[t];
    j->x = x; j->vals = vals; j->ids = ids; j->n = n; j->stride = stride; j->k = k;
    j->begin = rows * t / threads; j->end = rows * (t + 1) / threads;
  }
  int64_t started = 1;
  for (int64_t t = 1; t < threads; t++, started++)
    if (pthread_create(&tids[t], 0, run, &jobs[t])) break;
  run(&jobs[0]);
  for (int64_t t = started; t < threads; t++) run(&jobs[t]);  /* threads that failed */
  for (int64_t t = 1; t < started; t++) pthread_join(tids[t], 0);
  return 0;
}
"""


@functools.cache
def load():
    """The compiled library (``ctypes.CDLL``), or None where it cannot be built."""
    lib = _native.build_and_load("#include <math.h>\n" + _SOURCE)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.peer_row_topk.argtypes = [ptr] * 3 + [i64] * 5
    lib.peer_row_topk.restype = ctypes.c_int
    return lib


def fits(x: torch.Tensor, k: int) -> bool:
    """True when :func:`row_topk` takes ``x`` (fp32 on CPU, unit stride in the last dim)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 1
        and x.stride(-1) == 1
        and 1 <= k <= x.shape[-1]
        and load() is not None
    )


def row_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim=-1)`` (sorted, descending) of a CPU fp32 tensor, in C.

    Args:
        x: (..., n) scores; the last dim must have unit stride, rows any stride that
            flattens (e.g. a slice of the last dim of a contiguous tensor).
        k: 1 <= k <= n.

    Returns:
        values (..., k) and int64 indices (..., k).
    """
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n) if x.dim() > 1 else x.reshape(1, n)  # a view when it can be
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    vals = x.new_empty(rows.shape[0], k)
    ids = torch.empty(rows.shape[0], k, dtype=torch.int64)
    if rows.shape[0]:
        load().peer_row_topk(
            rows.data_ptr(), vals.data_ptr(), ids.data_ptr(),
            rows.shape[0], n, rows.stride(0), k, torch.get_num_threads(),
        )  # fmt: skip
    return vals.view(*lead, k), ids.view(*lead, k)
