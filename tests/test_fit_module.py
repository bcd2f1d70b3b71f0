"""fit_module trains with Lightning's own data fetchers even after another framework (NeMo's
MegatronStrategy) wrapped them process-wide."""

import lightning as L
import torch
from lightning.pytorch.loops import evaluation_loop, fit_loop, prediction_loop, utilities

from nemo_plugins.utils.training import fit_module


class _Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = 0

    def training_step(self, batch, _):
        self.seen += 1
        return ((self.w - batch) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_module_trains_after_a_foreign_data_fetcher_wrapper(monkeypatch):
    def foreign(original):  # what NeMo 2.7.3's MegatronStrategy.setup leaves behind
        return lambda trainer, stage: None if trainer.strategy.__class__.__name__ != "MegatronStrategy" else original(trainer, stage)

    for loop_module in (fit_loop, evaluation_loop, prediction_loop):
        monkeypatch.setattr(loop_module, "_select_data_fetcher", foreign(loop_module._select_data_fetcher))
    module = _Linear()
    loader = torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=2)
    fit_module(module, loader, max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu")  # fmt: skip
    assert module.seen == 2 and float(module.w) > 0
    assert fit_loop._select_data_fetcher is utilities._select_data_fetcher
