"""A dependency-free progress bar on stderr (shown only on a terminal, or when forced)."""

import sys
import time


class Progress:
    """``with Progress(total, "train") as bar: bar.update(n, loss=0.3)``.

    On a terminal: a bar redrawn at most ~10 times a second. When stderr is not a terminal
    (a log, CI) and ``enabled`` is None: one line when the stage ends (what, how many, how
    long), so logs show every stage without carriage-return noise. Silent when ``enabled``
    is False; a bar whatever the stream when it is True.
    """

    def __init__(self, total, desc="", enabled=None, stream=None):
        self.total, self.desc, self.n = max(int(total), 1), desc, 0
        self.stream = stream or sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lines = enabled is None and not tty
        self.enabled = tty if enabled is None else bool(enabled)
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
        if self.lines and exc[0] is None:
            el = time.perf_counter() - self.t0
            self.stream.write(f"{self.desc}: {self.n}/{self.total} in {el:.1f} s "
                              f"{self.postfix}".rstrip() + "\n")
            self.stream.flush()
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
