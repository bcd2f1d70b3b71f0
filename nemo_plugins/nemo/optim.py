"""NeMo's Megatron optimizer module, made to start with the pinned megatron-core.

NeMo 2.7.3's `setup_megatron_optimizer` calls megatron-core's `get_megatron_optimizer` with
`no_weight_decay_cond`, `scale_lr_cond` and `lr_mult`; megatron-core 0.16 replaced them with
`config_overrides` and rejects them (`TypeError: ... unexpected keyword argument
'no_weight_decay_cond'`), so every NeMo training job fails when it sets up its optimizer.
`MegatronOptimizer` passes on only the keywords the installed megatron-core takes. A dropped
keyword must be at NeMo's default (None, None, 1.0, which megatron-core's own defaults give);
another value is an error naming it, never silently ignored.
"""

import contextlib
import inspect

from . import require_nemo

require_nemo("nemo.lightning")

from nemo.lightning.pytorch.optim.megatron import MegatronOptimizerModule  # noqa: E402

# The keywords NeMo 2.7.3 passes that megatron-core 0.16 dropped, with the value meaning "unset".
NEMO_ONLY_DEFAULTS = {"no_weight_decay_cond": None, "scale_lr_cond": None, "lr_mult": 1.0}


@contextlib.contextmanager
def _accepted_keywords_only():
    """While NeMo sets up the optimizer, megatron-core's `get_megatron_optimizer` (NeMo imports it
    from `megatron.core.optimizer` at call time) drops the keywords it does not take."""
    import megatron.core.optimizer as mcore_optimizer

    original = mcore_optimizer.get_megatron_optimizer
    accepted = inspect.signature(original).parameters

    def get_megatron_optimizer(*args, **kwargs):
        for key in [k for k in kwargs if k not in accepted]:
            value = kwargs.pop(key)
            if key not in NEMO_ONLY_DEFAULTS or value != NEMO_ONLY_DEFAULTS[key]:
                raise TypeError(
                    f"optim.{key}={value!r}: the installed megatron-core's get_megatron_optimizer has no {key!r}; "
                    f"expected {NEMO_ONLY_DEFAULTS.get(key)!r} (set it through OptimizerConfig / config_overrides)"
                )
        return original(*args, **kwargs)

    mcore_optimizer.get_megatron_optimizer = get_megatron_optimizer
    try:
        yield
    finally:
        mcore_optimizer.get_megatron_optimizer = original


class MegatronOptimizer(MegatronOptimizerModule):
    """`MegatronOptimizerModule` that sets up with megatron-core 0.16 as well as older releases."""

    def optimizers(self, model):
        with _accepted_keywords_only():
            return super().optimizers(model)
