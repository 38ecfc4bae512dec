"""Handing freed heap memory back to the OS: glibc keeps the free pages of its heap when other allocations sit above them, so a
large transient structure (a vocabulary parsed once, a loader's arrays) would otherwise count towards the process for good."""

import ctypes

_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; elsewhere None


def trim_heap() -> None:
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)
