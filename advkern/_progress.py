"""A dependency-free progress bar on stderr (shown only on a terminal, or when forced)."""

import sys
import time


class Progress:
    """``with Progress(total, "train") as bar: bar.update(n, loss=0.3)``.

    Draws at most ~10 times a second; silent when ``enabled`` is False or stderr is not a
    terminal (CI logs stay clean), unless enabled is True explicitly.
    """

    def __init__(self, total, desc="", enabled=None, stream=None):
        self.total, self.desc, self.n = max(int(total), 1), desc, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else bool(enabled)
        self.t0 = self._last = time.perf_counter()
        self.postfix = ""

    def update(self, n=1, **postfix):
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in postfix.items())
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.n >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now):
        frac = min(self.n / self.total, 1.0)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        el = now - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        self.stream.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} "
                          f"{el:5.1f}s<{eta:5.1f}s {self.postfix}   ")
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
