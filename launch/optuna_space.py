"""An Optuna search space from Hydra's override grammar, as the command line and `hydra.sweeper.params` write it:

    'train.lr=tag(log, interval(1e-4, 3e-2))'     a float, sampled on a log scale
    'train.warmup_steps=range(50, 500, step=50)'  an int of that grid: 50, 100, ..., 450 (the stop is left out, as
                                                  the grid sweeper leaves it out)
    'model=choice(tiny,small)'                     one of the values
    model.n_layer=4                               fixed: every trial gets it as it is written

Parsed by Hydra's own override parser, as hydra-optuna-sweeper parsed it (its _impl.py), into Optuna 4's
distributions (IntDistribution, FloatDistribution, CategoricalDistribution).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)


@dataclass
class SearchSpace:
    """The swept keys with their distributions, and the overrides every trial gets as they are."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    def overrides(self, params: dict) -> list[str]:
        """One trial's command line: its sampled values, then the fixed overrides."""
        return [f"{name}={_encode(value)}" for name, value in params.items()] + self.fixed

    def grid(self) -> dict[str, list]:
        """Every value of each swept key, for hydra/sweeper/sampler=grid: only discrete distributions have them."""
        return {name: _grid_values(name, d) for name, d in self.distributions.items()}


def search_space(arguments: list[str]) -> SearchSpace:
    """The space of `arguments` (the sweeper's params first, then the command line's): a key given twice takes the
    later value, as Hydra's own overrides do."""
    space = SearchSpace()
    for override in OverridesParser.create().parse_overrides(arguments):
        name = override.get_key_element()
        space.distributions.pop(name, None)
        space.fixed = [x for x in space.fixed if not x.startswith(f"{name}=")]
        if override.is_sweep_override():
            space.distributions[name] = distribution(override)
        else:
            space.fixed.append(override.input_line)
    return space


def distribution(override: Override) -> BaseDistribution:
    value = override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):  # the values the grid sweeper would run: `stop` left out
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"{override.input_line}: the range holds no value")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if isinstance(value, IntervalSweep):  # Hydra reads an interval's ends as floats
        return FloatDistribution(float(value.start), float(value.end), log="log" in value.tags)
    raise ValueError(f"{override.input_line}: Optuna takes choice(...), range(...) and interval(...) sweeps")


def _grid_values(name: str, d: BaseDistribution) -> list:
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, (IntDistribution, FloatDistribution)) and d.step is not None and not d.log:
        count = round((d.high - d.low) / d.step) + 1
        return [d.low + i * d.step for i in range(count)]
    raise ValueError(f"hydra/sweeper/sampler=grid runs every value of {name}, and an interval(...) has no list of "
                     "them: use choice(...) or range(...)")


def _encode(value) -> str:
    """A sampled value as the override grammar reads it back (a categorical's values are encoded already)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
