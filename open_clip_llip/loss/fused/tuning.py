"""The autotuner's choices: per (launch or scheme, shape, dtype, device), the fastest option, timed once.

On a GPU the first call at a shape times each launch's candidates (``triton.testing.do_bench`` with the real
arguments) and keeps the fastest, keyed on the launch's constexprs, the dtype, sm_arch and b, B rounded up to
powers of two; then the backward's schemes the same way. The choices live in a ``TuningCache``, not in module
globals, so that a script or test can hold its own cache or clear the default one (``TUNING_CACHE``).
"""
import triton.testing

from .kernels import INTERPRETED


class TuningCache:
    """Which option runs, per key: timed the first time the key is seen, kept for the cache's life.

    Keys are tuples: (launch name, its constexprs, dtype, sm_arch, b and B rounded up to powers of two, scheme
    restriction) for a launch's candidates (``fastest``), and ('backward', H, K, d, the gradients wanted, the same
    tuning) for the backward schemes. ``TUNING_CACHE`` is the instance ``fused_sigmoid_loss`` uses.
    """

    def __init__(self):
        self._chosen = {}

    def __len__(self) -> int:
        return len(self._chosen)

    def __contains__(self, key) -> bool:
        return key in self._chosen

    def chosen(self, key: tuple):
        """The index of the option chosen for ``key``, or None where none was timed."""
        return self._chosen.get(key)

    def clear(self):
        """Forgets every choice: the next call at each shape times again."""
        self._chosen.clear()

    def choose(self, options: list, run, key: tuple):
        """The option to run: the first where there is nothing to choose or nothing to time (the interpreter), else
        the one that ``run`` ran fastest the first time ``key`` was seen. Timing reruns kernels, which is harmless:
        each only stores, or adds into sums that ``run`` zeroes first, and reads nothing it writes."""
        if len(options) == 1 or INTERPRETED:
            return options[0]
        if key not in self._chosen:
            times = [triton.testing.do_bench(lambda option=option: run(option), warmup=5, rep=25) for option in options]
            self._chosen[key] = times.index(min(times))
        return options[self._chosen[key]]

    def fastest(self, candidates: list, run, tuning: tuple):
        """The candidate of one launch (``launch.Launch``) to run (``choose``), keyed on the launch and ``tuning``."""
        first = candidates[0]
        return self.choose(candidates, run, (first.name, tuple(sorted(first.constexprs.items())), *tuning))


# The cache of the process: what fused_sigmoid_loss has timed so far.
TUNING_CACHE = TuningCache()
