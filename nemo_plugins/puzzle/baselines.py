"""The two naive compressions Puzzle is measured against, at the same budget and from the same
trained block library (so the comparison isolates the choice of blocks, not their training):

  uniform  every layer shrunk alike: of the choices that use one variant name for every
           attention group and one for every FFN group (one pair name in coupled mode), the one
           with the least summed replace-one-block KL that fits the budget
  drop     whole layers removed (attention and FFN no-op), least important first by their summed
           no-op KL, until the budget fits

Both work on the MIP's plain library ({group: {variant: {"stats", "metrics"}}}) and the bounds
it was solved under ({"stats.KEY": max}), so any budget the MIP takes applies to them too.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

NO_OP = "no_op"


def fits(library: dict, choices: Mapping[str, str], bounds: Mapping[str, float]) -> bool:
    """Whether `choices` meets every bound (the same sums the MIP constrains)."""
    for key, bound in bounds.items():
        stat = key.removeprefix("stats.")
        total = sum(library[g][name]["stats"][stat] for g, name in choices.items())
        if total > bound * (1 + 1e-9) + 1e-9:
            return False
    return True


def _summed(library: dict, choices: Mapping[str, str], metric: str) -> float:
    return sum(library[g][name]["metrics"][metric] for g, name in choices.items())


def _kind(group: str) -> str:
    """'attention' / 'ffn' for decoupled groups ('3.ffn'), 'block' for coupled ones ('3')."""
    return group.split(".", 1)[1] if "." in group else "block"


def uniform_choice(library: dict, bounds: Mapping[str, float], metric: str = "kl_div") -> dict[str, str] | None:
    """The best uniform shrink within `bounds`, or None when no uniform choice fits."""
    kinds: dict[str, list[str]] = {}
    for g in library:
        kinds.setdefault(_kind(g), []).append(g)
    # a name is uniform-eligible when every group of its kind has it
    names = {k: sorted(set.intersection(*(set(library[g]) for g in gs))) for k, gs in kinds.items()}
    best, best_score = None, float("inf")
    for combo in itertools.product(*names.values()):
        choice = {g: name for (kind, gs), name in zip(kinds.items(), combo) for g in gs}
        if fits(library, choice, bounds):
            score = _summed(library, choice, metric)
            if score < best_score:
                best, best_score = choice, score
    return best


def drop_choice(
    library: dict, parent_choice: Mapping[str, str], bounds: Mapping[str, float], metric: str = "kl_div"
) -> dict[str, str] | None:
    """The parent with whole layers removed, least important first, until within `bounds`; None
    when the library has no no-op variants or even dropping every layer does not fit."""
    layers: dict[str, list[str]] = {}
    for g in library:
        layers.setdefault(g.split(".", 1)[0], []).append(g)
    no_op = {g: NO_OP if NO_OP in library[g] else f"{NO_OP}+{NO_OP}" for g in library}
    if any(no_op[g] not in library[g] for g in library):
        return None
    cost = {layer: sum(library[g][no_op[g]]["metrics"][metric] for g in gs) for layer, gs in layers.items()}
    choice = dict(parent_choice)
    for layer in sorted(layers, key=lambda i: (cost[i], int(i))):
        if fits(library, choice, bounds):
            return choice
        choice.update({g: no_op[g] for g in layers[layer]})
    return choice if fits(library, choice, bounds) else None

