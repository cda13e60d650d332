"""Progress of long work, shown the same way everywhere: a tqdm bar on the terminal, or
calls to `progress(done, total, stage)` for a caller that draws its own (the app's bar).

`progress` is False (silent), True (a tqdm bar) or such a callable.
"""

from __future__ import annotations

from typing import Callable, Iterable, Union

from tqdm.auto import tqdm

OnProgress = Callable[[int, int, str], None]
ProgressArg = Union[bool, OnProgress]


class _Reporting:
    """The part of tqdm's interface that layerscope uses, reporting to a callable."""

    def __init__(self, iterable: Iterable | None, total: int, stage: str, report: OnProgress):
        self.iterable, self.total, self.stage, self.report = iterable, total, stage, report
        self.done = 0
        report(0, total, stage)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.report(self.done, self.total, self.stage)

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Reporting":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(progress: ProgressArg, iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it"):
    """A tqdm bar when `progress` is True, a silent one when False, and one that calls
    `progress(done, total, desc)` after each step when it is a callable."""
    if total is None and iterable is not None:
        total = len(iterable)  # type: ignore[arg-type]
    if callable(progress):
        return _Reporting(iterable, total or 0, desc, progress)
    return tqdm(iterable, total=total, disable=not progress, desc=desc, unit=unit)
