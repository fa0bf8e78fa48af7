"""The Hydra callback that closes every multirun: summary table, curves, best job (runner/sweep/summary.py).

Registered in conf/config.yaml under hydra.callbacks; it does nothing for single runs.
"""

from hydra.experimental.callback import Callback


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        from runner.sweep.summary import summarize_sweep

        summary = summarize_sweep(config.hydra.sweep.dir, config.sweep)
        if summary["failed"]:
            # The sweep went on past its failed jobs; the exit status still says that some failed.
            print(f"ftrun: {len(summary['failed'])} sweep job(s) failed: {summary['failed']}")
            raise SystemExit(1)
        if (summary["best_run"] or {}).get("error"):  # the best job trained, but was not registered (quality gate)
            raise SystemExit(1)
