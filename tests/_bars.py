"""A stand-in for tqdm that records every progress bar the library opens."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Bar:
    desc: str
    nested: bool  # opened while another bar was open


@dataclass
class BarRecorder:
    bars: list[Bar] = field(default_factory=list)
    open: int = 0

    def tqdm(self, iterable=None, *args, desc="", **kwargs):
        recorder = self
        recorder.bars.append(Bar(desc, nested=recorder.open > 0))

        class Recording:
            def __init__(self):
                recorder.open += 1
                self.closed = False

            def __iter__(self):
                try:
                    yield from iterable
                finally:
                    self.close()

            def close(self):
                if not self.closed:
                    self.closed = True
                    recorder.open -= 1

            def update(self, n=1):
                pass

        return Recording()


def record_bars(monkeypatch) -> BarRecorder:
    """Every bar ``secondorder._progress.progress`` opens from now on (it imports tqdm late)."""
    import tqdm.auto

    recorder = BarRecorder()
    monkeypatch.setattr(tqdm.auto, "tqdm", recorder.tqdm)
    return recorder
