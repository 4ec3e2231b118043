"""One metric writer: a progress line on the console and TensorBoard event files in the workdir."""

from __future__ import annotations

import os
from collections.abc import Mapping

from absl import logging


def _format(value: float) -> str:
  return f"{value:.4g}"


class MetricWriter:
  """Writes scalars to TensorBoard (`<workdir>/tb`) and logs them; drives a tqdm progress bar."""

  def __init__(self, workdir: str | os.PathLike, total_steps: int, initial_step: int = 0,
               progress: bool = True):
    from tensorboardX import SummaryWriter
    import tqdm

    self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tb"))
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, disable=not progress,
                          dynamic_ncols=True, mininterval=1.0)

  def advance(self, steps: int = 1, postfix: Mapping[str, float] | None = None) -> None:
    self._bar.update(steps)
    if postfix:
      self._bar.set_postfix({k: _format(v) for k, v in postfix.items()}, refresh=False)

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    for name, value in scalars.items():
      self._tb.add_scalar(f"{prefix}{name}", float(value), step)
    line = " ".join(f"{prefix}{k}={_format(float(v))}" for k, v in scalars.items())
    logging.info("step %d %s", step, line)
    self._bar.write(f"step {step} {line}")

  def flush(self) -> None:
    self._tb.flush()

  def close(self) -> None:
    self._tb.close()
    self._bar.close()
