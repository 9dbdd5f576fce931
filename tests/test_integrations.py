"""TensorBoard, Lightning and HF Trainer integrations, each against the real framework.

Every framework here is a test dependency (``make test`` installs the
extras), so none of these tests is skipped in CI.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import signalprop as sp

EVERY = 2


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def _batches(n: int, batch: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=g), torch.randint(0, 2, (batch,), generator=g)) for _ in range(n)]


# -- TensorBoard ---------------------------------------------------------------

def test_tensorboard_scalars_and_alerts_read_back_with_tensorboards_reader(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = _mlp()
    writer = SummaryWriter(str(tmp_path))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sp.monitor(model, every=EVERY, writer=writer, grad_every=1) as mon:
        for k, (x, y) in enumerate(_batches(6, batch=32)):  # 32 samples per unit: dead shares reported
            if k == 5:
                x = x * float("nan")  # a non-finite step: an alert, written as text
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    writer.close()

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for q in ("grad_rms", "relative_grad_rms", "forward_second_moment"):
        for layer in ("0", "1", "2", "3", "4"):
            assert f"signalprop/{q}/{layer}" in tags
    assert "signalprop/saturation/1" in tags and "signalprop/dead_fraction/3" in tags
    assert "signalprop/update_ratio/0" in tags
    # values and steps as the monitor holds them (TensorBoard stores float32)
    got = [(e.step, e.value) for e in acc.Scalars("signalprop/grad_rms/2")]
    want = [(h.step, h.layers[2].grad_rms) for h in mon.history]
    assert [s for s, _ in got] == [s for s, _ in want] == [0, 2, 4]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6)
    losses = [(e.step, e.value) for e in acc.Scalars("signalprop/loss")]
    assert [s for s, _ in losses] == [0, 1, 2, 3, 4]  # step 5's loss is NaN: not written
    assert losses[3][1] == pytest.approx(mon.losses[3], rel=1e-6)
    texts = acc.Tensors("signalprop/alerts/text_summary")
    assert any(t.step == 5 and b"non-finite" in t.tensor_proto.string_val[0] for t in texts)


# -- Lightning -------------------------------------------------------------------

PossibleUserWarning = pytest.importorskip("lightning.fabric.utilities.warnings").PossibleUserWarning


def _lightning_warnings(f):
    """Lightning's own advice (few dataloader workers, small log interval) and its
    use of torch's deprecated ``LeafSpec`` (torch 2.13): not about signalprop."""
    f = pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")(f)
    return pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning")(f)


class _LitMLP(__import__("lightning.pytorch", fromlist=["LightningModule"]).LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = _mlp()
        self.lr = lr
        self.seen: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.seen.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit(tmp_path, lr: float, logger, accumulate: int = 2, precision: str | None = "32-true", steps: int = 6,
         plugins=None, **cb_kwargs):
    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    data = torch.utils.data.TensorDataset(*map(torch.cat, zip(*_batches(steps * accumulate))))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)
    cb = SignalpropCallback(every=EVERY, grad_every=1, **cb_kwargs)
    module = _LitMLP(lr)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, callbacks=[cb],
                         accumulate_grad_batches=accumulate, precision=precision, plugins=plugins,
                         enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, loader)
    return cb, module, trainer


@_lightning_warnings
def test_lightning_callback_steps_once_per_optimizer_step_with_accumulation(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb, module, trainer = _fit(tmp_path, 0.05, CSVLogger(str(tmp_path)), accumulate=2)
    mon = cb.monitor
    assert trainer.global_step == 6 and mon.steps == list(range(6))
    assert [h.step for h in mon.history] == [0, 2, 4]
    # the loss of a step is the mean of its two micro-batches' losses
    for k in range(6):
        assert mon.losses[k] == pytest.approx((module.seen[2 * k] + module.seen[2 * k + 1]) / 2, rel=1e-6)
    # the sampled forward is the step's first micro-batch: the rows are the net's layers, measured once
    assert [layer.name for layer in mon.history[0].layers] == ["net.0", "net.1", "net.2", "net.3", "net.4"]
    assert mon._handles == []  # closed after fit
    # the scalars went to the trainer's logger (CSV)
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "signalprop/grad_rms/net.2" in metrics and "signalprop/loss" in metrics


@_lightning_warnings
def test_lightning_callback_under_bf16_mixed_precision_and_tensorboard_logger(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    cb, module, trainer = _fit(tmp_path, 0.05, TensorBoardLogger(str(tmp_path)), accumulate=1,
                               precision="bf16-mixed", steps=4)
    mon = cb.monitor
    assert mon.steps == [0, 1, 2, 3] and all(math.isfinite(v) for v in mon.losses)
    assert mon.history[0].verdict == "healthy" and len(mon.history[0].layers) == 5
    assert mon.losses[0] == pytest.approx(module.seen[0], rel=1e-6)


@_lightning_warnings
def test_lightning_callback_passes_the_precision_plugins_grad_scaler(tmp_path):
    """"16-mixed" (float16 autocast and a GradScaler; on the CPU through the
    plugin, which Lightning's precision flag refuses there): the callback
    hands the plugin's scaler to the monitor, so the scaler's first steps,
    which overflow at a scale of 2**26 and are skipped while it backs off,
    are listed, not alerted, and the samples hold the scale they were taken
    at.  Oracle for the skipped steps: the weights did not move in them."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 26)
    moved: list[bool] = []

    class _Watch(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.before = [p.detach().clone() for p in module.parameters()]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            moved.append(any(not torch.equal(a, p) for a, p in zip(self.before, module.parameters())))

    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    cb = SignalpropCallback(every=EVERY, grad_every=1)
    data = torch.utils.data.TensorDataset(*map(torch.cat, zip(*_batches(12))))
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, callbacks=[cb, _Watch()],
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    module = _LitMLP(0.05)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    mon = cb.monitor
    assert mon._scale is not None and mon._scale.scaler is scaler
    skipped = [k for k, m in enumerate(moved) if not m]
    assert 2 <= len(skipped) < len(moved) and mon.scaler_skipped == skipped
    assert not [a for a in mon.alerts if a.kind == "non-finite"]
    assert mon.history[0].loss_scale == 2.0 ** 26
    assert mon.losses[0] == pytest.approx(module.seen[0], rel=1e-3)


@_lightning_warnings
def test_lightning_callback_logs_alerts_and_applies_agc(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning.pytorch.callbacks.signalprop"):
        cb, _, _ = _fit(tmp_path, 60.0, False, accumulate=1, steps=12, agc=None)
    assert cb.monitor.alerts, "a learning rate of 60 must alert"
    logged = [r.getMessage() for r in caplog.records if r.name == "lightning.pytorch.callbacks.signalprop"]
    assert logged and logged[0] == f"signalprop: {cb.monitor.alerts[0]}"


# -- HF Trainer ------------------------------------------------------------------

class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_callback_on_tiny_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from signalprop.integrations.transformers import SignalpropCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    cb = SignalpropCallback(every=EVERY, grad_every=1)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(48), callbacks=[cb])
    trainer.train()
    mon = cb.monitor
    assert mon.steps == list(range(6)) and [h.step for h in mon.history] == [0, 2, 4]
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 6
    for a, b in zip(mon.losses, logged):  # the Trainer rounds its logged loss to 4 decimals
        assert a == pytest.approx(b, abs=1e-4)
    names = [layer.name for layer in mon.history[0].layers]
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" in names
    assert mon.history[0].verdict == "healthy"
    assert mon._handles == [] and cb._hook is None



def test_hf_trainer_callback_passes_accelerates_grad_scaler(tmp_path):
    """An fp16 Trainer's accelerator scales the loss with a GradScaler that
    its optimizer wrapper holds (``AcceleratedOptimizer.scaler``); the
    callback hands it to the monitor.  Float16 needs a GPU here, so the
    scaler is set on the CPU accelerator (float32, a scale of 2**20: exact,
    no overflow, no clipping before the step so the gradients stay scaled
    until the scaler's step): every gradient norm and sampled row equals the
    same run's without a scaler (the weights do: scaling by a power of 2)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from signalprop.integrations.transformers import SignalpropCallback

    class _ScaledTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)

    runs = []
    for cls in (Trainer, _ScaledTrainer):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
        cb = SignalpropCallback(every=EVERY, grad_every=1)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                 disable_tqdm=True, seed=0, max_grad_norm=0)
        trainer = cls(model=model, args=args, train_dataset=_Tokens(48), callbacks=[cb])
        trainer.train()
        runs.append((cb.monitor, trainer))
    (a, _), (b, tb) = runs
    assert b._scale is not None and b._scale.scaler is tb.accelerator.scaler and a._scale is None
    assert [h.loss_scale for h in b.history] == [2.0 ** 20] * 2
    assert b.grad_norms == pytest.approx(a.grad_norms, rel=1e-6)
    for ha, hb in zip(a.history, b.history):
        for la, lb in zip(ha.layers, hb.layers):
            assert lb.grad_rms == pytest.approx(la.grad_rms, rel=1e-6), la.name
    assert b.alerts == a.alerts == []

@_lightning_warnings
def test_lightning_checkpoint_carries_the_monitor(tmp_path):
    """fit(ckpt_path=...) resumes the monitor: its step count continues from
    the checkpoint's, its baseline samples are the first run's, its alerts
    stay (the previous version restarted at step 0 with no history)."""
    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    data = torch.utils.data.TensorDataset(*map(torch.cat, zip(*_batches(12))))

    def fit(steps, ckpt=None):
        cb = SignalpropCallback(every=EVERY, grad_every=1)
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=[cb],
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             default_root_dir=str(tmp_path))
        trainer.fit(_LitMLP(0.05), torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=ckpt)
        return cb, trainer

    first, trainer = fit(4)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    torch.load(tmp_path / "c.ckpt", weights_only=True)  # plain values only
    resumed, _ = fit(8, str(tmp_path / "c.ckpt"))
    mon = resumed.monitor
    assert mon.steps[-4:] == [4, 5, 6, 7] and mon.steps[:4] == [0, 1, 2, 3]
    assert [h.step for h in mon.history] == [0, 2, 4, 6]
    assert mon.history[0].layers == first.monitor.history[0].layers


@pytest.mark.parametrize("restore", [False, True])
def test_hf_checkpoint_carries_the_monitor(tmp_path, restore):
    """train(resume_from_checkpoint=...) restores the monitor into the same
    callback object the user holds, continuing its step count -- also with
    the Trainer's own callback restore while the first run's callback is
    still alive (a notebook run again: the restore handed the Trainer that
    old callback, and the user's new one never got a monitor)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from signalprop.integrations.transformers import SignalpropCallback

    def train(steps, resume=None):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
        cb = SignalpropCallback(every=EVERY, grad_every=1)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                                 learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=4,
                                 use_cpu=True, disable_tqdm=True, seed=0,
                                 restore_callback_states_from_checkpoint=restore)
        Trainer(model=model, args=args, train_dataset=_Tokens(48), callbacks=[cb]).train(
            resume_from_checkpoint=resume)
        return cb

    first = train(4)
    cb = train(6, str(tmp_path / "checkpoint-4"))
    assert cb is not first and first.monitor.steps == [0, 1, 2, 3]
    assert cb.monitor.steps[-2:] == [4, 5] and cb.monitor.steps[:4] == [0, 1, 2, 3]
    assert [h.step for h in cb.monitor.history] == [0, 2, 4]


class _LitGAN(__import__("lightning.pytorch", fromlist=["LightningModule"]).LightningModule):
    """Manual optimization: D's step, then G's, each with its own optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.G = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
        self.D = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
        self.d_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x = batch[0]
        og, od = self.optimizers()
        fake = self.G(torch.randn(x.shape[0], 8, generator=torch.Generator().manual_seed(batch_idx)))
        d_loss = nn.functional.softplus(-self.D(x)).mean() + nn.functional.softplus(self.D(fake.detach())).mean()
        od.zero_grad()
        self.manual_backward(d_loss)
        od.step()
        g_loss = nn.functional.softplus(-self.D(fake)).mean()
        og.zero_grad()
        self.manual_backward(g_loss)
        og.step()
        self.d_losses.append(float(d_loss.detach()))

    def configure_optimizers(self):
        return [torch.optim.Adam(self.G.parameters(), 1e-3), torch.optim.Adam(self.D.parameters(), 1e-3)]


@_lightning_warnings
def test_lightning_manual_gan_records_the_first_optimizers_loss(tmp_path):
    """Two optimizers stepped by hand in one batch: the step closes at the
    first (D's) with its loss.  The previous version left G's loss of the
    batch in the callback and added it to the next batch's D loss."""
    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    cb = SignalpropCallback(every=EVERY, module="D")
    module = _LitGAN()
    data = torch.utils.data.TensorDataset(torch.randn(96, 8, generator=torch.Generator().manual_seed(3)))
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    assert len(module.d_losses) == 6
    assert cb.monitor.losses == pytest.approx(module.d_losses, rel=1e-6)


@_lightning_warnings
def test_lightning_a_second_fit_continues_the_monitor(tmp_path):
    """``trainer.fit`` again on the same module (more steps after a first fit,
    a ``validate`` between): the monitor continues its step count, baselines
    and alerts, as a resume from a checkpoint does, instead of starting at
    step 0 again (its TensorBoard steps were written twice)."""
    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    cb = SignalpropCallback(every=EVERY, grad_every=1)
    module = _LitMLP(0.05)
    data = torch.utils.data.TensorDataset(*map(torch.cat, zip(*_batches(12))))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    kw = dict(accelerator="cpu", devices=1, logger=False, callbacks=[cb], enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer = pl.Trainer(max_steps=4, **kw)
    trainer.fit(module, loader)
    first = cb.monitor
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit(module, loader)
    assert cb.monitor is not first and cb.monitor.steps == list(range(8))
    assert [h.step for h in cb.monitor.history][:2] == [0, 2]
    other = _LitMLP(0.05)  # another module: a monitor of its own, from step 0
    pl.Trainer(max_steps=2, **kw).fit(other, loader)
    assert cb.monitor.steps == [0, 1]


def test_hf_train_again_after_an_interrupted_train(tmp_path):
    """A train() that ends in an exception (an interrupt, an OOM) never
    reaches on_train_end: the next train() with the same callback and model
    closes that monitor and takes its loss hook off first (both hooks summed
    the losses: the monitor read twice the Trainer's loss, and the old
    monitor kept every step's inputs)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from signalprop.integrations.transformers import SignalpropCallback

    class Interrupt(TrainerCallback):
        armed = True

        def on_step_end(self, args, state, control, **kw):
            if self.armed and state.global_step == 3:
                raise KeyboardInterrupt

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    cb, stop = SignalpropCallback(every=2, grad_every=1), Interrupt()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model=model, args=args, train_dataset=_Tokens(32), callbacks=[cb, stop]).train()
    first = cb.monitor
    stop.armed = False
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(32), callbacks=[cb, stop])
    trainer.train()
    assert first._closed and cb.monitor is not first and cb.monitor.steps == [0, 1, 2, 3]
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert cb.monitor.losses == pytest.approx(logged, abs=1e-4)
    assert not model._forward_hooks and not model._forward_pre_hooks


@_lightning_warnings
def test_lightning_a_logger_that_fails_does_not_stop_the_fit(tmp_path):
    """A logger whose log_metrics raises (a rejected metric name, a network
    error) becomes one warning; the fit goes on and the values stay in the
    monitor's history."""
    import warnings

    from lightning.pytorch.loggers import CSVLogger

    class Strict(CSVLogger):
        def log_metrics(self, metrics, step=None):
            raise ValueError("metric rejected")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb, _, _ = _fit(tmp_path, 0.05, Strict(str(tmp_path)), accumulate=1, steps=4)
    assert cb.monitor.steps == [0, 1, 2, 3] and cb.monitor.history
    said = [str(w.message) for w in caught if "signalprop monitor" in str(w.message)]
    assert said and all("failed" in s and "training is unaffected" in s for s in said)


def test_a_failing_writer_keeps_the_steps_alerts():
    """A writer that raises (a closed connection): the step was measured, its
    alerts are returned and the warning says the writer failed (it said the
    step was not measured and returned no alert)."""
    import warnings

    class Gone:
        def add_scalar(self, *a, **k):
            raise ConnectionError("writer gone")

        add_text = add_histogram = add_scalars = add_custom_scalars = add_scalar

    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    returned = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sp.monitor(m, every=2, writer=Gone(), histograms=False) as mon:
            for k, (x, y) in enumerate(_batches(4)):
                if k == 2:
                    x = x.clone()
                    x[0, 0] = float("nan")
                loss = nn.functional.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                returned.append([a.kind for a in mon.step(loss)])
                opt.step()
    assert returned[2] == ["non-finite"] and len(mon.history) == 2
    said = [str(w.message) for w in caught if "signalprop monitor" in str(w.message)]
    assert said and "the writer failed" in said[0] and "not measured" not in " ".join(said)


@_lightning_warnings
def test_lightning_two_callbacks_watch_a_gans_two_networks(tmp_path):
    """One callback per network of a GAN stepped by hand (D's optimizer, then
    G's): both share a Trainer and its checkpoints (a state key per watched
    module: the previous version's Trainer refused two callbacks), each step
    closes at its own network's optimizer with that network's loss, and G's
    samples hold G's gradients (closed at D's step, before G's backward,
    they held none).  Each monitor gets its network's optimizer."""
    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    cbs = [SignalpropCallback(every=2, module="G"), SignalpropCallback(every=2, module="D")]
    module = _LitGAN()
    data = torch.utils.data.TensorDataset(torch.randn(96, 8, generator=torch.Generator().manual_seed(3)))
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, callbacks=cbs,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    g, d = (cb.monitor for cb in cbs)
    assert g.steps == d.steps == list(range(6))
    assert d.losses == pytest.approx(module.d_losses, rel=1e-6)
    assert all(x is not None and x > 0 for x in g.losses) and g.losses != pytest.approx(d.losses)
    for h in g.history:
        assert not h.incomplete and all(lay.grad_rms for lay in h.layers)
    for mon in (g, d):  # Adam's second-moment lag: read from the optimizer the callback found
        assert any(lay.adam_lag_rms is not None for h in mon.history for lay in h.layers)
    assert cbs[0].state_key != cbs[1].state_key
    trainer.save_checkpoint(tmp_path / "gan.ckpt")
    saved = torch.load(tmp_path / "gan.ckpt", weights_only=True)["callbacks"]
    assert {saved[cb.state_key]["step"] for cb in cbs} == {6}


@pytest.mark.parametrize("which", ["lightning", "hf"])
@pytest.mark.parametrize("bad,error", [({"every": 0}, ValueError), ({"agc": -1.0}, ValueError),
                                       ({"evry": 5}, TypeError), ({"max_history": 2}, ValueError),
                                       ({"histograms": "yes"}, TypeError),
                                       ({"group": "world"}, TypeError)])
def test_callbacks_check_their_arguments_when_built(which, bad, error):
    """A wrong monitor argument fails when the callback is built, with the
    monitor's own message, not when training starts (minutes later, after
    the data and the model have loaded)."""
    if which == "lightning":
        from signalprop.integrations.lightning import SignalpropCallback
    else:
        from signalprop.integrations.transformers import SignalpropCallback
    kw = {"every": 5, **bad}
    with pytest.raises(error) as got:
        SignalpropCallback(**kw)
    if error is TypeError and "evry" in bad:  # a keyword the monitor does not take: named, with the ones it does
        assert "SignalpropCallback() got an unexpected keyword argument 'evry'" in str(got.value)
        assert "every, writer, agc" in str(got.value)
        return
    with pytest.raises(error) as direct:
        sp.monitor(_mlp(), **kw)
    assert str(got.value) == str(direct.value)


@_lightning_warnings
def test_lightning_resume_from_a_checkpoint_without_the_monitor(tmp_path):
    """A checkpoint saved before the callback was added holds no monitor
    state: the resumed fit's monitor counts on from the trainer's step
    (it counted from 0 again, and its steps overlapped the first run's)."""
    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    data = torch.utils.data.TensorDataset(*map(torch.cat, zip(*_batches(12))))
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer = pl.Trainer(max_steps=4, **kw)
    trainer.fit(_LitMLP(0.05), torch.utils.data.DataLoader(data, batch_size=16))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    cb = SignalpropCallback(every=EVERY, grad_every=1)
    pl.Trainer(max_steps=8, callbacks=[cb], **kw).fit(_LitMLP(0.05), torch.utils.data.DataLoader(data, batch_size=16),
                                                      ckpt_path=str(tmp_path / "plain.ckpt"))
    assert cb.monitor.steps == [4, 5, 6, 7]
    assert [h.step for h in cb.monitor.history] == [4, 6]


@_lightning_warnings
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")  # the checkpoint callback
def test_lightning_resume_from_a_mid_run_checkpoint_without_the_monitor(tmp_path):
    """The same from a checkpoint ModelCheckpoint saved at a batch's end
    (``every_n_train_steps``): it holds the batches that stepped before that
    batch (3 of 4), which Lightning moves on by one as it resumes; read when
    training started, the monitor's steps were one behind Lightning's own
    (3, 4, ...: step 3 written twice to a shared logger).  Read at the first
    batch, they are Lightning's."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from signalprop.integrations.lightning import SignalpropCallback

    data = torch.utils.data.TensorDataset(*map(torch.cat, zip(*_batches(12))))
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(tmp_path))
    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=4, save_top_k=-1)
    pl.Trainer(max_steps=4, callbacks=[ck], **kw).fit(_LitMLP(0.05), torch.utils.data.DataLoader(data, batch_size=16))
    (path,) = list((tmp_path / "ck").glob("*.ckpt"))
    saved = torch.load(path, weights_only=False)["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]
    assert saved == 3  # what makes this case: the count before the batch that saved it
    cb = SignalpropCallback(every=EVERY, grad_every=1)
    pl.Trainer(max_steps=8, callbacks=[cb], enable_checkpointing=False, **kw).fit(
        _LitMLP(0.05), torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=str(path))
    assert cb.monitor.steps == [4, 5, 6, 7]
    assert [h.step for h in cb.monitor.history] == [4, 6]


def _hf_train(tmp_path, steps, callbacks, resume=None, examples=48):
    """A tiny GPT-2 trained by the HF Trainer, saving a checkpoint every 4 steps into ``tmp_path``."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=4,
                             use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=_Tokens(examples), callbacks=callbacks).train(
        resume_from_checkpoint=resume)


def test_hf_resume_from_a_checkpoint_without_the_monitor(tmp_path):
    """The HF callback added to a run resumed from a checkpoint saved without
    it counts on from the Trainer's global step, and the Trainer's next
    checkpoint is saved (the Trainer's state read from the old checkpoint
    had no entry for the callback, and saving raised KeyError)."""
    from signalprop.integrations.transformers import SignalpropCallback

    _hf_train(tmp_path, 4, [])
    cb = SignalpropCallback(every=EVERY, grad_every=1)
    _hf_train(tmp_path, 8, [cb], str(tmp_path / "checkpoint-4"))  # saving checkpoint-8 raised KeyError in the Trainer
    assert cb.monitor.steps == [4, 5, 6, 7] and [h.step for h in cb.monitor.history] == [4, 6]
    # the Trainer's optimizer, passed on: Adam's second-moment lag is measured
    assert any(lay.adam_lag_rms is not None for h in cb.monitor.history for lay in h.layers)


def test_start_at_numbers_steps_from_the_given_count():
    """Monitor.start_at: the first step() is that step (sampled when it is a
    multiple of every), before the first step only, and a count >= 0."""
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    mon = sp.monitor(m, every=2, histograms=False)
    with pytest.raises(ValueError, match="step count"):
        mon.start_at(-1)
    mon.start_at(7)
    for x, y in _batches(3):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        mon.step(loss)
        opt.step()
    assert mon.steps == [7, 8, 9] and [h.step for h in mon.history] == [8]
    with pytest.raises(RuntimeError, match="before this monitor's first step"):
        mon.start_at(0)
    mon.close()


@_lightning_warnings
def test_lightning_callback_state_across_versions_and_optimizers(tmp_path):
    """A checkpoint saved under the class's name (before the key named the
    watched module) still resumes a callback with module=, and a GAN's run
    resumed from a checkpoint without the callbacks numbers its monitors by
    the batches that stepped, as the run with them throughout does (the
    trainer's global_step counts both optimizers' steps: twice as many)."""
    import warnings

    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    class Before(SignalpropCallback):
        @property
        def state_key(self):
            return "SignalpropCallback"

    kw = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path))
    data = torch.utils.data.TensorDataset(*map(torch.cat, zip(*_batches(12))))
    old = Before(every=EVERY, grad_every=1, module="net")
    trainer = pl.Trainer(max_steps=4, callbacks=[old], **kw)
    trainer.fit(_LitMLP(0.05), torch.utils.data.DataLoader(data, batch_size=16))
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    cb = SignalpropCallback(every=EVERY, grad_every=1, module="net")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own: the saved key is not a callback's key now
        pl.Trainer(max_steps=8, callbacks=[cb], **kw).fit(_LitMLP(0.05), torch.utils.data.DataLoader(data, batch_size=16),
                                                          ckpt_path=str(tmp_path / "old.ckpt"))
    assert cb.monitor.steps == list(range(8)) and [h.step for h in cb.monitor.history] == [0, 2, 4, 6]

    gan = torch.utils.data.TensorDataset(torch.randn(96, 8, generator=torch.Generator().manual_seed(3)))
    trainer = pl.Trainer(max_steps=8, **kw)
    trainer.fit(_LitGAN(), torch.utils.data.DataLoader(gan, batch_size=16))
    trainer.save_checkpoint(tmp_path / "gan.ckpt")
    assert trainer.global_step == 8  # 4 batches, two optimizer steps each
    cbs = [SignalpropCallback(every=2, module="G"), SignalpropCallback(every=2, module="D")]
    pl.Trainer(max_steps=12, callbacks=cbs, **kw).fit(_LitGAN(), torch.utils.data.DataLoader(gan, batch_size=16),
                                                      ckpt_path=str(tmp_path / "gan.ckpt"))
    assert cbs[0].monitor.steps == cbs[1].monitor.steps == [4, 5]


def test_hf_two_callbacks_resume_their_own_states(tmp_path):
    """Two HF callbacks added to a run resumed from a checkpoint without
    them, then resumed again: each continues its own monitor (the Trainer's
    save overwrote one callback's state with the other's, and a resume read
    the states taken when the run began, none)."""
    from signalprop.integrations.transformers import SignalpropCallback

    _hf_train(tmp_path, 4, [], examples=64)
    a, b = SignalpropCallback(every=2, grad_every=1), SignalpropCallback(every=3, grad_every=1)
    _hf_train(tmp_path, 8, [a, b], str(tmp_path / "checkpoint-4"), examples=64)
    assert [h.step for h in a.monitor.history] == [4, 6] and [h.step for h in b.monitor.history] == [6]
    c, d = SignalpropCallback(every=2, grad_every=1), SignalpropCallback(every=3, grad_every=1)
    _hf_train(tmp_path, 12, [c, d], str(tmp_path / "checkpoint-8"), examples=64)
    assert [h.step for h in c.monitor.history] == [4, 6, 8, 10]
    assert [h.step for h in d.monitor.history] == [6, 9]


@_lightning_warnings
def test_lightning_gan_resume_keeps_which_forward_to_sample(tmp_path):
    """A discriminator's monitor learns, from a sample whose forward's
    gradients the generator's step zeroed, to sample each step's last
    forward; a checkpoint carries that (a resumed run's first sample was
    incomplete again)."""
    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    kw = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path))
    gan = torch.utils.data.TensorDataset(torch.randn(96, 8, generator=torch.Generator().manual_seed(3)))
    first = SignalpropCallback(every=2, module="D")
    trainer = pl.Trainer(max_steps=8, callbacks=[first], **kw)
    trainer.fit(_LitGAN(), torch.utils.data.DataLoader(gan, batch_size=16))
    assert any(h.incomplete for h in first.monitor.history)  # what it learned from
    trainer.save_checkpoint(tmp_path / "d.ckpt")
    cb = SignalpropCallback(every=2, module="D")
    pl.Trainer(max_steps=16, callbacks=[cb], **kw).fit(_LitGAN(), torch.utils.data.DataLoader(gan, batch_size=16),
                                                       ckpt_path=str(tmp_path / "d.ckpt"))
    resumed = [h for h in cb.monitor.history if h.step >= 4]
    assert resumed and not any(h.incomplete for h in resumed), [(h.step, h.incomplete[:40]) for h in resumed]


@_lightning_warnings
def test_lightning_follows_an_optimizer_made_anew(tmp_path):
    """The trainer makes its optimizers anew mid-fit (strategy.setup_optimizers,
    as after unfreezing a backbone): the optimizer the callback gave the
    monitor follows, so the update statistics read the one that steps (they
    read the abandoned optimizer's Adam state)."""
    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    class Anew(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.strategy.setup_optimizers(trainer)

    seen = []

    class Watch(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(cb.monitor.optimizer is optimizer)

    class Adam(_LitMLP):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    cb = SignalpropCallback(every=2, grad_every=1)
    data = torch.utils.data.TensorDataset(*map(torch.cat, zip(*_batches(4))))
    pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, callbacks=[cb, Anew(), Watch()],
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               default_root_dir=str(tmp_path)).fit(Adam(0.0), torch.utils.data.DataLoader(data, batch_size=16))
    assert len(seen) == 8 and all(seen)


@_lightning_warnings
def test_lightning_two_callbacks_write_apart_to_one_logger(tmp_path):
    """Two callbacks (a GAN's networks) writing to one TensorBoard logger:
    each one's tags start signalprop.<module>/, read back with TensorBoard's
    reader (both wrote signalprop/loss and the same layer names, "0", "1",
    "2", into one series); a single callback keeps signalprop/."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from signalprop.integrations.lightning import SignalpropCallback

    gan = torch.utils.data.TensorDataset(torch.randn(96, 8, generator=torch.Generator().manual_seed(3)))
    cbs = [SignalpropCallback(every=2, module="G"), SignalpropCallback(every=2, module="D")]
    logger = TensorBoardLogger(str(tmp_path), name="gan")
    pl.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=logger, callbacks=cbs, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
               default_root_dir=str(tmp_path)).fit(_LitGAN(), torch.utils.data.DataLoader(gan, batch_size=16))
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "signalprop.G/loss" in tags and "signalprop.D/loss" in tags and "signalprop/loss" not in tags
    assert any(t.startswith("signalprop.G/grad_rms/") for t in tags)
    g_loss = [e.value for e in acc.Scalars("signalprop.G/loss")]
    d_loss = [e.value for e in acc.Scalars("signalprop.D/loss")]
    assert len(g_loss) == len(d_loss) == 4 and g_loss != d_loss


class _LitNaNBatch(_LitMLP):
    """Its 4th batch (index 3) carries a NaN."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 3:
            x = x.clone()
            x[0, 0] = float("nan")
        return super().training_step((x, y), batch_idx)


@_lightning_warnings
def test_lightning_skip_under_automatic_optimisation(tmp_path):
    """(Outside review) ``SignalpropCallback(skip=opt)`` under Lightning's
    automatic optimisation, whose ``optimizer.step(closure)`` runs the
    forward, the backward and the monitor's step inside the closure: the
    NaN batch's update was applied and the next step was skipped before its
    closure ran, and Lightning raised ("The closure hasn't been executed").
    The NaN step is skipped and the fit finishes with finite weights, its
    other steps as an unmonitored fit that leaves that step out takes them."""
    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback

    data = torch.utils.data.TensorDataset(*map(torch.cat, zip(*_batches(8))))

    def fit(callbacks, skip_by_hand=False):
        torch.manual_seed(0)
        module = _LitNaNBatch(0.05)
        opt = torch.optim.SGD(module.parameters(), lr=0.05)
        module.configure_optimizers = lambda: opt
        if skip_by_hand:
            module.on_before_optimizer_step = lambda o: setattr(o, "_nan", module.trainer.global_step == 3)
            plain = opt.step

            def step(closure=None):
                loss = closure()
                return loss if opt._nan else plain(closure=lambda: loss)

            opt.step = step
        cbs = [c(opt) for c in callbacks]
        pl.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False, callbacks=cbs, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=str(tmp_path)).fit(module, torch.utils.data.DataLoader(data, batch_size=16))
        return module, cbs

    watched, cbs = fit([lambda opt: SignalpropCallback(every=50, skip=opt)])
    assert cbs[0].monitor.skipped == [3] and cbs[0].monitor.steps == list(range(8))
    assert all(torch.isfinite(p).all() for p in watched.parameters())
    by_hand, _ = fit([], skip_by_hand=True)
    for p, q in zip(watched.parameters(), by_hand.parameters()):
        assert torch.equal(p, q)


def test_hf_skip_skips_the_nan_step_only(tmp_path):
    """(Outside review) HF Trainer with ``SignalpropCallback(skip=opt)`` and
    one NaN batch: the monitor replays the NaN step through the model to
    locate it, and the callback's forward hook took the replay's NaN loss
    for the next step's -- whose healthy update was skipped too.  Only the
    NaN step is skipped now, bit for bit as an optimizer that skips a
    non-finite step by hand, with and without gradient accumulation."""
    import math

    from transformers import Trainer, TrainingArguments

    from signalprop.integrations.transformers import SignalpropCallback

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": nn.functional.cross_entropy(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(1)
            self.x, self.y = torch.randn(160, 8, generator=g), torch.randint(0, 3, (160,), generator=g)
            self.x[16 * 5 + 3, 0] = math.nan  # in the 6th batch of 16

        def __len__(self):
            return 160

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    class SkipsNonFinite(torch.optim.SGD):
        def step(self, closure=None):
            if not all(torch.isfinite(p.grad).all() for g in self.param_groups for p in g["params"]
                       if p.grad is not None):
                return None
            return super().step(closure)

    def fit(monitored, accum):
        m = Net()
        opt = (torch.optim.SGD if monitored else SkipsNonFinite)(m.parameters(), lr=0.05, momentum=0.9)
        cbs = [SignalpropCallback(every=2, skip=opt)] if monitored else []
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16,
                                 gradient_accumulation_steps=accum, max_steps=10 // accum, use_cpu=True,
                                 report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                                 seed=0, data_seed=0, disable_tqdm=True, max_grad_norm=0)
        Trainer(model=m, args=args, train_dataset=Data(), optimizers=(opt, None), callbacks=cbs).train()
        return m, cbs

    for accum in (1, 2):
        by_hand, _ = fit(False, accum)
        watched, cbs = fit(True, accum)
        assert len(cbs[0].monitor.skipped) == 1, (accum, cbs[0].monitor.skipped)
        for p, q in zip(by_hand.parameters(), watched.parameters()):
            assert torch.equal(p, q), accum
