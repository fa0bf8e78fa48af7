"""Start-up cost of `ftrun --cfg job` against a trivial Hydra app, side by side in one run.

    python bench/startup.py [--runs 7]

Prints the median wall time of each and the ratio (target: ftrun <= 2.0x the trivial app). Both run as fresh
processes, so the figure includes interpreter start-up and every import the CLI path pays for.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TRIVIAL_APP = textwrap.dedent(
    """
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path=None, config_name=None)
    def main(cfg: DictConfig) -> None:
        pass

    if __name__ == "__main__":
        main()
    """
)


def median_wall(cmd, runs, cwd):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "trivial_app.py"
        app.write_text(TRIVIAL_APP)
        commands = {
            "trivial hydra app --cfg job (baseline)": [sys.executable, str(app), "--cfg", "job"],
            "ftrun --cfg job": [sys.executable, "-m", "runner.cli", "--cfg", "job"],
            "ftrun experiment=phi3_ultrachat --cfg job": [sys.executable, "-m", "runner.cli",
                                                           "experiment=phi3_ultrachat", "--cfg", "job"],
        }
        # warm the OS file cache once so the first measured run is not an outlier
        for cmd in commands.values():
            subprocess.run(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results = {name: median_wall(cmd, args.runs, repo) for name, cmd in commands.items()}
    baseline = results["trivial hydra app --cfg job (baseline)"]
    print(f"{'command':<48} {'median s':>9} {'ratio':>7}   (median of {args.runs} runs)")
    for name, seconds in results.items():
        print(f"{name:<48} {seconds:>9.3f} {seconds / baseline:>6.2f}x")
    worst = max(results.values()) / baseline
    print(f"target: <= 2.00x  -> {'met' if worst <= 2.0 else 'NOT met'} (worst {worst:.2f}x)")


if __name__ == "__main__":
    main()
