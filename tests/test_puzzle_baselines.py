"""Uniform shrinking and layer dropping as Puzzle's baselines: both meet the MIP's bounds, uniform
takes the best-scoring uniform choice, drop removes the least important layers first."""

from nemo_plugins.puzzle.baselines import drop_choice, fits, uniform_choice


def entry(params, kl):
    return {"stats": {"num_params": params}, "metrics": {"kl_div": kl}}


def library(layer_kls):
    """Decoupled groups per layer: parent, a half-size variant, no-op; layer i's no-op KLs are
    layer_kls[i] (attention and FFN alike)."""
    lib = {}
    for i, kl in enumerate(layer_kls):
        lib[f"{i}.attention"] = {"gqa_kv4": entry(10, 0.0), "gqa_kv1": entry(5, 0.1), "no_op": entry(0, kl)}
        lib[f"{i}.ffn"] = {"swiglu_64": entry(20, 0.0), "swiglu_32": entry(10, 0.2), "no_op": entry(0, kl)}
    return lib


PARENT = {f"{i}.{s}": n for i in range(3) for s, n in (("attention", "gqa_kv4"), ("ffn", "swiglu_64"))}


def test_fits_sums_stats_over_groups():
    lib = library([1.0, 1.0, 1.0])
    assert fits(lib, PARENT, {"stats.num_params": 90})
    assert not fits(lib, PARENT, {"stats.num_params": 89.9})


def test_uniform_takes_the_best_fitting_uniform_choice():
    lib = library([5.0, 5.0, 5.0])
    # 60 of 90: kv1 + half FFN everywhere (45) and kv4 + half FFN (60) fit; the second loses less
    choice = uniform_choice(lib, {"stats.num_params": 60})
    assert set(choice[f"{i}.attention"] for i in range(3)) == {"gqa_kv4"}
    assert set(choice[f"{i}.ffn"] for i in range(3)) == {"swiglu_32"}
    assert uniform_choice(lib, {"stats.num_params": -1}) is None


def test_drop_removes_the_least_important_layers_first():
    lib = library([3.0, 1.0, 2.0])
    choice = drop_choice(lib, PARENT, {"stats.num_params": 30})  # two of three 30-parameter layers go
    assert choice["0.attention"] == "gqa_kv4" and choice["0.ffn"] == "swiglu_64"
    assert {choice["1.attention"], choice["1.ffn"], choice["2.attention"], choice["2.ffn"]} == {"no_op"}
    assert drop_choice(lib, PARENT, {"stats.num_params": 90}) == PARENT  # nothing to drop
    no_drop = {g: {n: v for n, v in vs.items() if n != "no_op"} for g, vs in lib.items()}
    assert drop_choice(no_drop, PARENT, {"stats.num_params": 30}) is None


def test_coupled_groups():
    lib = {str(i): {"a+f": entry(30, 0.0), "b+f": entry(20, 0.3), "no_op+no_op": entry(0, float(i))} for i in range(2)}
    assert uniform_choice(lib, {"stats.num_params": 40}) == {"0": "b+f", "1": "b+f"}
    assert drop_choice(lib, {"0": "a+f", "1": "a+f"}, {"stats.num_params": 30}) == {"0": "no_op+no_op", "1": "a+f"}
