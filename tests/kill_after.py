"""Test helper: run ``python -m MODULE ARGS`` and kill it (``os._exit(137)``: no cleanup, like SIGKILL) right after a
checkpoint, so tests can prove that a killed run resumes. The package itself carries no test hook.

    python tests/kill_after.py rows 2 -m hf_blockcbo.cli calibrate ...   # after the 2nd Hessian checkpoint
    python tests/kill_after.py step 10 -m hf_blockcbo.cli heal ...       # after the healing checkpoint at step >= 10
"""

import os
import runpy
import sys


def _kill_after_rows(limit: int) -> None:
    from hf_blockcbo.hessian.resume import PartialRows

    original, saved = PartialRows.save, []

    def save(self, rows, losses):
        original(self, rows, losses)
        saved.append(rows.shape[0])
        if len(saved) >= limit:
            os._exit(137)

    PartialRows.save = save


def _kill_after_step(limit: int) -> None:
    from transformers import Trainer

    original = Trainer._save_checkpoint

    def save_checkpoint(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.global_step >= limit:
            os._exit(137)

    Trainer._save_checkpoint = save_checkpoint


def main() -> None:
    what, limit, flag, module = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if what not in ("rows", "step") or flag != "-m":
        raise SystemExit("usage: kill_after.py rows|step N -m MODULE ARGS...")
    (_kill_after_rows if what == "rows" else _kill_after_step)(limit)
    sys.argv = [module, *sys.argv[5:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
