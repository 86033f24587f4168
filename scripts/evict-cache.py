#!/usr/bin/env python3
"""Drops the page cache of every file under the given directories, without root:
posix_fadvise(POSIX_FADV_DONTNEED) on each file evicts its clean pages (run `sync` first so
that none is dirty). A "cold" read afterwards comes from the disk as far as this machine's
kernel is concerned (a VM's host may still hold the data in its own cache).
    scripts/evict-cache.py DIR [DIR ...]
"""
import os
import sys

for top in sys.argv[1:]:
    for root, _, files in os.walk(top):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
