"""Lightning callbacks the loop tests share: a simulated crash and a record of the steps run."""

import lightning as L


class Crash(L.Callback):
    """Raise after optimizer step `at` (the loops count steps in `step_count`)."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.step_count == self.at:
            raise RuntimeError(f"simulated crash after step {self.at}")


class Steps(L.Callback):
    """Record the step counter after every batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(pl_module.step_count)
