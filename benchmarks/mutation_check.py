"""A small mutation check of regclip's core: plant one realistic bug at a time, rerun the
tests that cover that module, and record whether they failed (the mutant was caught).

Each mutant is a single textual edit of one source file (a flipped sign, a wrong divisor,
a swapped clip side, a dropped ``abs``, an off-by-one...). The check runs on a copy of
``src/``, ``tests/`` and ``pyproject.toml`` in a temporary folder, so the working tree is
never touched; the copy's file is restored after every mutant.

    python benchmarks/mutation_check.py            # all mutants -> benchmarks/results/mutation.json
    python benchmarks/mutation_check.py --only 3 7  # a few, by index (results not written)
    python benchmarks/mutation_check.py --tests /tmp/old/tests  # another suite, same mutants

The result is compact JSON: ``{"mutants": [{"file", "description", "caught"}], "caught": n,
"total": m}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "mutation.json"

KERNEL_TESTS = ("tests/test_kernels.py", "tests/test_ratio.py", "tests/test_loss.py")
RATIO_TESTS = ("tests/test_ratio.py", "tests/test_loss.py")
WEIGHT_TESTS = ("tests/test_reweight.py", "tests/test_loss.py")
SURROGATE_TESTS = ("tests/test_surrogate.py", "tests/test_loss.py", "tests/test_diagnostics.py")
LOSS_TESTS = ("tests/test_loss.py", "tests/test_diagnostics.py")
DIAGNOSTIC_TESTS = ("tests/test_diagnostics.py", "tests/test_loss.py")
ADVANTAGE_TESTS = ("tests/test_advantages.py",)


@dataclass(frozen=True)
class Mutant:
    file: str
    """Path under ``src/regclip``."""
    old: str
    """Text that occurs exactly once in the file."""
    new: str
    description: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("kernels.py", "torch.sqrt(t / (1 - denom_t))", "torch.sqrt(t / (1 + denom_t))",
           "Flow-SDE sigma_t: 1 - t flipped to 1 + t", KERNEL_TESTS),
    Mutant("kernels.py", "return self.eta * torch.sqrt(-dt)", "return self.eta * -dt",
           "Dance-SDE std: sqrt(-dt) dropped", KERNEL_TESTS),
    Mutant("kernels.py", "return -sq / (2 * s**2) - torch.log(s)",
           "return -sq / (2 * s) - torch.log(s)",
           "Gaussian log-prob divides by 2 s instead of 2 s^2", KERNEL_TESTS),
    Mutant("kernels.py", "return euler - 0.5 * self.eta**2 * score * dt_",
           "return euler + 0.5 * self.eta**2 * score * dt_",
           "Dance-SDE mean: score-correction sign flipped", KERNEL_TESTS),
    Mutant("ratio.py", "cross - 0.5 * _mean_dims(delta**2)", "cross + 0.5 * _mean_dims(delta**2)",
           "closed-form log-ratio: bias term sign flipped", RATIO_TESTS),
    Mutant("ratio.py", "log_ratio = numerator / std**2", "log_ratio = numerator / std",
           "closed-form log-ratio divided by s instead of s^2", RATIO_TESTS),
    Mutant("ratio.py", "_mean_dims(delta**2) / (2 * std**2)", "_mean_dims(delta**2) / std**2",
           "log-prob route: bias b_t missing its 1/2", RATIO_TESTS),
    Mutant("reweight.py", "return 1.0 / normalizer.velocity_gain(batch).abs()",
           "return 1.0 / normalizer.velocity_gain(batch)",
           "equalizing weight loses its abs (negative weights)", WEIGHT_TESTS),
    Mutant("reweight.py", "return 1.0 / batch.dt.abs()", "return 1.0 / batch.dt",
           "inverse-dt weight loses its abs (negative weights)", WEIGHT_TESTS),
    Mutant("reweight.py", "beta = 1 + self.eta**2 * (1 - t) / (2 * t)",
           "beta = 1 + self.eta**2 * (1 - t) / t",
           "Dance beta weight: missing factor 1/2", WEIGHT_TESTS),
    Mutant("surrogate.py", "clipped |= (advantages > 0) & (ratio > upper)",
           "clipped |= (advantages < 0) & (ratio > upper)",
           "clip mask: upper side attributed to negative advantages", SURROGATE_TESTS),
    Mutant("surrogate.py", "loss = torch.maximum(unclipped, -advantages",
           "loss = torch.minimum(unclipped, -advantages",
           "PPO surrogate: max replaced by min", SURROGATE_TESTS),
    Mutant("surrogate.py", "lower = None if self.low is None else 1.0 - self.low",
           "lower = None if self.low is None else 1.0 + self.low",
           "lower clip bound 1 + low instead of 1 - low", SURROGATE_TESTS),
    Mutant("surrogate.py", "dual_clipped = (advantages < 0) & (ratio > self.dual)",
           "dual_clipped = (advantages > 0) & (ratio > self.dual)",
           "dual-clip mask on the wrong advantage sign", SURROGATE_TESTS),
    Mutant("loss.py", "loss = policy_loss + self.kl.coef * kl",
           "loss = policy_loss - self.kl.coef * kl", "KL term subtracted", LOSS_TESTS),
    Mutant("loss.py", "raw_adv.clamp(-self.adv_clip, self.adv_clip)",
           "raw_adv.clamp(max=self.adv_clip)",
           "advantage clip on the upper side only", LOSS_TESTS),
    Mutant("loss.py", "policy_loss = (weight * out.loss).mean()",
           "policy_loss = (weight * out.loss).sum()",
           "policy loss summed instead of averaged", LOSS_TESTS),
    Mutant("kl.py", "var = var / batch.dt.to(dtype).abs()",
           "var = var * batch.dt.to(dtype).abs()",
           "sigma-convention KL: variance multiplied by |dt|", LOSS_TESTS),
    Mutant("diagnostics.py", '"clip/pos_low": _fraction(below, pos)',
           '"clip/pos_low": _fraction(below, neg)',
           "metric clip/pos_low counted over negative advantages", DIAGNOSTIC_TESTS),
    Mutant("diagnostics.py", "return (mask & within).sum() / count.clamp(min=1)",
           "return (mask & within).sum() / (count + 1)",
           "per-sign clip fractions: off-by-one denominator", DIAGNOSTIC_TESTS),
    Mutant("diagnostics.py", 'acc["neg_low"] += float((neg & below & sel).sum())',
           'acc["neg_low"] += float((pos & below & sel).sum())',
           "TimestepDiagnostics neg_low counts positive advantages", DIAGNOSTIC_TESTS),
    Mutant("diagnostics.py", "-r.mean() / r_std, torch.zeros_like(r_std)",
           "r.mean() / r_std, torch.zeros_like(r_std)",
           "log_ratio/shift_z sign flipped", DIAGNOSTIC_TESTS),
    Mutant("advantages.py", "ddof = 1 if unbiased else 0", "ddof = 0 if unbiased else 1",
           "advantage std: ddof swapped", ADVANTAGE_TESTS),
    Mutant("advantages.py", "advantages = centered / (scale + eps)",
           "advantages = centered / scale + eps",
           "advantage eps added after the division", ADVANTAGE_TESTS),
    Mutant("batch.py", "((t_b > 0) & (t_b <= 1))", "((t_b >= 0) & (t_b <= 1))",
           "t range check admits t = 0", ("tests/test_loss.py",)),
)  # fmt: skip


def _copy_tree(dest: Path, tests: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    shutil.copytree(tests, dest / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _tests_fail(workdir: Path, tests: tuple[str, ...], timeout: float) -> bool:
    """Whether the given tests fail (a timeout counts as failing: the mutant was noticed)."""
    env = {**os.environ, "PYTHONPATH": f"{workdir / 'src'}{os.pathsep}{workdir}"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return True
    if result.returncode not in (0, 1):  # collection or usage error: the check is broken
        raise RuntimeError(f"pytest exited {result.returncode}:\n{result.stdout[-2000:]}")
    return result.returncode == 1


def run(indices: list[int], timeout: float, tests: Path) -> list[dict[str, object]]:
    records = []
    with tempfile.TemporaryDirectory(prefix="regclip-mutation-") as tmp:
        workdir = Path(tmp)
        _copy_tree(workdir, tests)
        if _tests_fail(workdir, tuple(sorted({t for m in MUTANTS for t in m.tests})), timeout):
            raise RuntimeError("the unmutated tests fail: fix them before checking mutants")
        for index in indices:
            mutant = MUTANTS[index]
            path = workdir / "src" / "regclip" / mutant.file
            original = path.read_text()
            if original.count(mutant.old) != 1:
                raise RuntimeError(f"mutant {index}: {mutant.old!r} is not unique in {mutant.file}")
            start = time.perf_counter()
            try:
                path.write_text(original.replace(mutant.old, mutant.new))
                caught = _tests_fail(workdir, mutant.tests, timeout)
            finally:
                path.write_text(original)
            print(
                f"[{index:2d}] {'caught' if caught else 'MISSED'} "
                f"({time.perf_counter() - start:4.0f} s) {mutant.file}: {mutant.description}",
                flush=True,
            )
            records.append(
                {"file": mutant.file, "description": mutant.description, "caught": caught}
            )
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="+", help="mutant indices to run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    parser.add_argument(
        "--tests",
        type=Path,
        default=ROOT / "tests",
        help="tests folder to run (e.g. an older suite, to compare); results not written",
    )
    args = parser.parse_args()
    indices = args.only if args.only else list(range(len(MUTANTS)))
    records = run(indices, args.timeout, args.tests)
    caught = sum(bool(r["caught"]) for r in records)
    print(f"caught {caught} of {len(records)}")
    if not args.only and args.tests == ROOT / "tests":
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        result = {"mutants": records, "caught": caught, "total": len(records)}
        RESULT.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
