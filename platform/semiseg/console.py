"""The console of `semiseg grid`: one status line per trial, as a Ray Tune callback.

Tune's own progress tables are off (`RunConfig(verbose=0)`) and the workers' output stays in each
trial's run.log (see `semiseg.launch.capture_logs`). On a terminal the running trials' lines are
rewritten in place; otherwise a trial gets a line when it starts (with its log file), one every
`interval_s` while it runs, and one when it ends.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.experiment import Trial

from semiseg import ray_local
from semiseg.grid_config import Grid
from semiseg.launch import RUN_LOG

PROGRESS_INTERVAL_S = 300.0
"""Without a terminal, how often a running trial prints its line: the demo grid's 12 trials of a few
minutes print 2-3 lines each, then the table (~21 lines)."""
CLEAR_BLOCK = "\x1b[{n}F\x1b[J"
"""ANSI: up `n` lines to column 1, then erase to the end of the screen."""


class GridConsole(tune.Callback):
    """Tune callback printing each trial's method, split, seed, epoch / epochs, last and best mIoU, ETA.

    Tune pickles its callbacks with the experiment, so `--resume` gets this object back: everything that
    depends on the console (terminal or not, Ray's output on or off) is decided in `setup`.
    """

    def __init__(self, grid: Grid, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.grid = grid
        self.interval_s = interval_s
        self.setup()

    def setup(self, **info: Any) -> None:
        """Called by Tune at the start of every fit (a resumed one too)."""
        # Ray's own lines would land inside a block rewritten in place: plain lines then.
        self._live = sys.stdout.isatty() and not ray_local.shows_worker_logs()
        self._running: dict[str, str] = {}
        self._printed_at: dict[str, float] = {}
        self._drawn = 0
        self._width = max(len(self._text(t.axes)) for t in self.grid.trials)  # lines in columns

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        """Say where the trial's log is, once."""
        run_log = Path(self.grid.trial(trial.config).config.out_dir) / RUN_LOG
        self._running[trial.trial_id] = f"{self._label(trial)}  starting"
        self._printed_at[trial.trial_id] = time.monotonic()
        self._emit([f"{self._label(trial)}  started, log: {_short(run_log)}"])

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        """Update the trial's line with the epoch it just reported."""
        if "miou" not in result:
            return
        line = f"{self._label(trial)}  {self._progress(trial, result)}"
        self._running[trial.trial_id] = line
        if self._live:
            self._emit([])
        elif time.monotonic() - self._printed_at.get(trial.trial_id, 0.0) >= self.interval_s:
            self._printed_at[trial.trial_id] = time.monotonic()
            self._emit([line])

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        """The trial's last line: its final epoch and mIoU."""
        self._end(trial, "done")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        """The trial failed: its last line points at its log."""
        run_log = Path(self.grid.trial(trial.config).config.out_dir) / RUN_LOG
        self._end(trial, f"FAILED (log: {_short(run_log)})")

    def _end(self, trial: Trial, outcome: str) -> None:
        self._running.pop(trial.trial_id, None)
        last = trial.last_result or {}
        progress = f"  {self._progress(trial, last, eta=False)}" if "miou" in last else ""
        self._emit([f"{self._label(trial)}  {outcome}{progress}"])

    def _label(self, trial: Trial) -> str:
        return self._text(self.grid.trial(trial.config).axes).ljust(self._width)

    def _text(self, axes: dict[str, Any]) -> str:
        dataset = f"{axes['dataset']} " if "dataset" in self.grid.axes else ""
        return f"{dataset}{axes['method']} {axes['split']} seed {axes['seed']}"

    def _progress(self, trial: Trial, result: dict, eta: bool = True) -> str:
        epochs = self.grid.trial(trial.config).config.optim.epochs
        done = int(result["epoch"]) + 1
        text = f"epoch {done}/{epochs}  mIoU {result['miou']:.2f} (best {result['best_miou']:.2f})"
        # The first report's interval includes the worker group's start-up: no ETA from it.
        if eta and done < epochs and result.get("iterations_since_restore", 0) > 1:
            text += f"  ETA {_duration(result['time_this_iter_s'] * (epochs - done))}"
        return text

    def _emit(self, lines: list[str]) -> None:
        """Print `lines` for good; on a terminal, redraw the running trials' block below them."""
        out = sys.stdout
        if not self._live:
            out.write("".join(f"{line}\n" for line in lines))
            out.flush()
            return
        width = shutil.get_terminal_size().columns - 1  # a wrapped line would break the block's height
        block = [line[:width] for line in self._running.values()]
        out.write(CLEAR_BLOCK.format(n=self._drawn) if self._drawn else "")
        out.write("".join(f"{line}\n" for line in lines + block))
        out.flush()
        self._drawn = len(block)


def _short(path: Path) -> str:
    """`path` relative to the working directory when it lies below it."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"
