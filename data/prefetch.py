"""Read ahead in a background thread, so that decoding and collating the next batches overlaps the
training step (torch and PIL release the GIL for the heavy parts)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator


class Prefetch:
    """Iterate `source` in a daemon thread, up to `depth` items ahead. An exception in `source` is
    raised by the `next()` that would have returned its item; `close()` stops the thread."""

    _DONE = object()

    def __init__(self, source: Iterator, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source,), daemon=True, name="prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
