"""One training loop for every objective: JEM, plain CE, PGD adversarial training, Gaussian augmentation.

The loop is shared; each objective contributes one loss function ``loss(ctx, x, y) -> (loss, terms)``.
Resumable (``last.pt`` at log boundaries, at least every ``save_every_s`` seconds), with a divergence
guard that rolls back to the last good checkpoint and retries with a lower learning rate and a new
sampler seed a bounded number of times.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import atomic_write, model_from_checkpoint, read_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import ImageDataset, load_dataset
from .errors import UserError
from .model import EnergyModel, to_internal, to_pixels
from .sgld import ReplayBuffer, sgld

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """JEM training diverged more often than ``max_retries`` allows."""


@dataclass
class Context:
    """What a loss function may use besides the batch."""

    cfg: TrainConfig
    model: EnergyModel
    generator: torch.Generator
    buffer: ReplayBuffer | None
    autocast: Callable[[], Any]
    phase: str = "main"


LossFn = Callable[[Context, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def _randn_like(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _ce_terms(ctx: Context, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ce = F.cross_entropy(logits.float(), y)
    return ce, {"ce": ce.detach(), "acc": (logits.argmax(1) == y).float().mean(),
                "pred_top": torch.bincount(logits.argmax(1), minlength=ctx.cfg.model.n_classes).max().float()
                / y.numel()}


def ce_loss(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain cross-entropy on [0,1] images (with ``data_noise`` in the internal space, as JEM does)."""
    z = to_internal(x)
    if ctx.cfg.data_noise > 0:
        z = z + ctx.cfg.data_noise * _randn_like(z, ctx.generator)
    with ctx.autocast():
        logits = ctx.model.logits_z(z)
    return _ce_terms(ctx, logits, y)


def jem_loss(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """JEM: CE + log p(x) by PCD (Grathwohl et al. 2020, Eq. 8), optional L2 penalty on energies."""
    cfg, model, buf = ctx.cfg, ctx.model, ctx.buffer
    assert buf is not None
    z = to_internal(x)
    if cfg.data_noise > 0:
        z = z + cfg.data_noise * _randn_like(z, ctx.generator)
    z0, idx = buf.sample(x.shape[0])
    was_training = model.training
    model.eval()
    with ctx.autocast():
        zq = sgld(model.energy_z, z0, cfg.sgld.steps, cfg.sgld.step_size, cfg.sgld.noise, generator=ctx.generator)
    model.train(was_training)
    buf.update(idx, zq)
    with ctx.autocast():
        logits = model.logits_z(torch.cat([z, zq]))
    logits = logits.float()
    n = x.shape[0]
    e_data = -torch.logsumexp(logits[:n], 1)
    e_sample = -torch.logsumexp(logits[n:], 1)
    ce, terms = _ce_terms(ctx, logits[:n], y)
    l_px = e_data.mean() - e_sample.mean()
    loss = ce + cfg.px_weight * l_px
    if cfg.energy_l2 > 0:
        loss = loss + cfg.energy_l2 * (e_data.pow(2).mean() + e_sample.pow(2).mean())
    terms.update(px=l_px.detach(), e_data=e_data.mean().detach(), e_sample=e_sample.mean().detach())
    return loss, terms


def pgd_linf(model: EnergyModel, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float,
             generator: torch.Generator, autocast: Callable[[], Any]) -> torch.Tensor:
    """Madry et al. (2018) L-inf PGD with random start, for the inner maximisation of PGD-AT only.

    (The attack suite uses torchattacks; this copy exists so training draws its random start from the
    run's own generator and stays resumable bit for bit.)
    """
    delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with autocast():
            loss = F.cross_entropy(model(x_adv).float(), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def pgd_at_loss(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Madry PGD adversarial training: CE on L-inf PGD examples."""
    cfg, model = ctx.cfg, ctx.model
    was_training = model.training
    model.eval()
    x_adv = pgd_linf(model, x, y, cfg.pgd_eps, cfg.pgd_steps, cfg.pgd_step_size, ctx.generator, ctx.autocast)
    model.train(was_training)
    with ctx.autocast():
        logits = model(x_adv)
    return _ce_terms(ctx, logits, y)


def gaussian_aug_loss(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gaussian data augmentation with std ``sigma`` in pixel space (Cohen et al. 2019; Salman et al. 2019)."""
    x_noisy = x + ctx.cfg.sigma * _randn_like(x, ctx.generator)
    with ctx.autocast():
        logits = ctx.model(x_noisy)
    return _ce_terms(ctx, logits, y)


LOSSES: dict[str, LossFn] = {"jem": jem_loss, "ce": ce_loss, "pgd-at": pgd_at_loss, "gaussian-aug": gaussian_aug_loss}


def lr_at(cfg: TrainConfig, step: int, lr_scale: float = 1.0) -> float:
    """Learning rate at ``step``: CE warm start, linear warm-up, then step decay at ``decay_at``."""
    if step < cfg.ce_warmup_iters:
        return cfg.ce_warmup_lr * lr_scale
    lr = cfg.lr * lr_scale
    since = step - cfg.ce_warmup_iters
    if cfg.warmup_iters > 0 and since < cfg.warmup_iters:
        return lr * (since + 1) / cfg.warmup_iters
    return lr * cfg.decay_rate ** sum(step >= d for d in cfg.decay_at)


class BatchOrder:
    """Deterministic batches: step t of epoch e uses a permutation seeded by (seed, e). No state to save."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if batch_size > n:
            raise UserError(f"batch size {batch_size} exceeds the data set size {n}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ImageDataset, device: torch.device, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on the whole of ``data``."""
    was = model.training
    model.eval()
    correct = torch.zeros((), device=device)
    for i in range(0, len(data), batch_size):
        x, y = data.batch(slice(i, i + batch_size))
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum()
    model.train(was)
    return float(correct) / len(data)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 10) -> None:
    """Save [0,1] images (N, C, H, W) as one PNG grid (matplotlib; no torchvision)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = images[i]
    arr = grid.permute(1, 2, 0).numpy()
    atomic_write(path, lambda f: plt.imsave(f, arr[..., 0] if c == 1 else arr, cmap="gray" if c == 1 else None,
                                            vmin=0, vmax=1, format="png"))


@dataclass
class _Window:
    """Metric sums over a log window, kept on the device (read once per window)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        terms = dict(terms, loss=loss.detach())
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def read(self) -> dict[str, float]:
        if not self.count:
            return {}
        vals = torch.stack(list(self.sums.values())).cpu().tolist()
        out = {k: v / self.count for k, v in zip(self.sums, vals)}
        self.sums, self.count = {}, 0
        return out


def diverged(row: dict[str, float], best_acc: float, cfg: TrainConfig) -> str | None:
    """Why a log window looks diverged, or None. Checks NaN/inf, energy blow-up and prediction collapse."""
    if any(isinstance(v, float) and not math.isfinite(v) for v in row.values()):
        return "non-finite loss or metric"
    if "e_data" in row and abs(row["e_data"] - row["e_sample"]) > cfg.divergence_gap:
        return f"energy gap {row['e_data'] - row['e_sample']:.3g} exceeds {cfg.divergence_gap:g}"
    if "e_data" in row and max(abs(row["e_data"]), abs(row["e_sample"])) > 1e6:
        return "energies exploded"
    if best_acc > 0.5 and row.get("pred_top", 0) > 0.8 and row.get("acc", 1) < 0.35:
        return f"collapse to a constant prediction (accuracy {row['acc']:.2f})"
    return None


class Trainer:
    """State of one run: model, optimiser, sampler, generator, step; knows how to save and restore."""

    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device, data_dir: str | None = None) -> None:
        self.cfg, self.out, self.device = cfg, out, device
        self.train_data = load_dataset(cfg.dataset, "train", data_dir)
        self.test_data = load_dataset(cfg.dataset, "test", data_dir)
        c, h, w = self.train_data.shape
        m = cfg.model
        if (c, h) != (m.in_channels, m.image_size) or len(self.train_data.classes) != m.n_classes:
            raise UserError(f"data set {cfg.dataset} is {c}x{h}x{w} with {len(self.train_data.classes)} classes, "
                            f"the model expects {m.in_channels}x{m.image_size} with {m.n_classes}")
        self.order = BatchOrder(len(self.train_data), cfg.batch_size, cfg.seed)
        self.step = 0
        self.lr_scale = 1.0
        self.retries = 0
        self.best_acc = 0.0
        self.model: EnergyModel
        self.build(seed_offset=0)

    def build(self, seed_offset: int) -> None:
        cfg = self.cfg
        torch_gen = torch.Generator().manual_seed(cfg.seed)
        self.model = EnergyModel(cfg.model)
        with torch.no_grad():  # deterministic init from the run's seed, without touching the global RNG
            for p in self.model.parameters():
                if p.dim() > 1:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=torch_gen) * math.sqrt(2.0 / (1 + cfg.model.leak ** 2)
                                                                                  / fan_in))
                else:
                    p.zero_()
        self.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        fused = self.device.type == "cuda"
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr_at(cfg, 0), weight_decay=cfg.weight_decay,
                                    **({"fused": True} if fused else {}))
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * seed_offset)
        self.buffer = None
        if cfg.objective == "jem":
            self.buffer = ReplayBuffer(cfg.sgld.buffer_size, self.train_data.shape, cfg.sgld.reinit_freq,
                                       device=self.device, generator=self.gen)
        self.compiled = torch.compile(self.model) if cfg.compile else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    # --- persistence -----------------------------------------------------------------------------
    def save(self, name: str, metrics: dict[str, Any] | None = None) -> Path:
        path = self.out / name
        save_checkpoint(
            path, cfg=self.cfg, model=self.model, step=self.step, classes=self.train_data.classes,
            optimizer=self.opt.state_dict(), buffer=None if self.buffer is None else self.buffer.buffer,
            rng={"gen": self.gen.get_state()}, metrics=metrics,
            state={"lr_scale": self.lr_scale, "retries": self.retries, "best_acc": self.best_acc},
        )
        return path

    def restore(self, path: Path) -> None:
        ckpt = read_checkpoint(path, map_location="cpu")
        if ckpt["config"].model != self.cfg.model or ckpt["config"].objective != self.cfg.objective:
            raise UserError(f"{path} was trained with another architecture or objective than this run")
        self.model.load_state_dict(model_from_checkpoint(ckpt, path).state_dict())
        if ckpt.get("optimizer"):
            self.opt.load_state_dict(ckpt["optimizer"])
        if self.buffer is not None and ckpt.get("buffer") is not None:
            self.buffer.load_state_dict({"buffer": ckpt["buffer"]})
        if "gen" in ckpt.get("rng", {}):
            self.gen.set_state(ckpt["rng"]["gen"])
        self.step = int(ckpt["step"])
        st = ckpt["state"]
        self.lr_scale, self.retries = st.get("lr_scale", 1.0), st.get("retries", 0)
        self.best_acc = st.get("best_acc", 0.0)

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, stop_at: int | None = None, progress: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        loss_fn = LOSSES[cfg.objective]
        metrics_path = self.out / "metrics.jsonl"
        end = cfg.iters if stop_at is None else min(stop_at, cfg.iters)
        window = _Window()
        last_save = time.monotonic()
        t_window = time.monotonic()
        steps_window = 0
        bar = tqdm(total=cfg.iters, initial=self.step, desc=f"train {cfg.objective}", disable=not progress,
                   dynamic_ncols=True)
        while self.step < end:
            idx = self.order.indices(self.step)
            x, y = self.train_data.batch(idx)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = lr_at(cfg, self.step, self.lr_scale)
            for group in self.opt.param_groups:
                group["lr"] = lr
            ctx = Context(cfg, self.model, self.gen, self.buffer, self.autocast,
                          phase="ce-warmup" if self.step < cfg.ce_warmup_iters else "main")
            loss, terms = (ce_loss if ctx.phase == "ce-warmup" else loss_fn)(ctx, x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            window.add(terms, loss)
            self.step += 1
            steps_window += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == end:
                row = window.read()
                elapsed = time.monotonic() - t_window
                row.update(step=self.step, lr=lr, it_per_s=steps_window / max(elapsed, 1e-9), phase=ctx.phase)
                t_window, steps_window = time.monotonic(), 0
                why = diverged(row, self.best_acc, cfg)
                if why:
                    self.recover(why, metrics_path)
                    window = _Window()
                    continue
                self.best_acc = max(self.best_acc, row.get("acc", 0.0))
                _append_jsonl(metrics_path, row)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "acc", "e_data", "e_sample") if k in row})
                if time.monotonic() - last_save >= cfg.save_every_s or self.step == end:
                    self.save("last.pt")
                    last_save = time.monotonic()
        bar.close()
        return {"step": self.step}

    def recover(self, why: str, metrics_path: Path) -> None:
        """Roll back to the last good checkpoint (or the start), halve the lr, reseed the sampler."""
        if self.retries >= self.cfg.max_retries:
            raise TrainingDiverged(f"training diverged at step {self.step} ({why}) after {self.retries} retries; "
                                   f"last good checkpoint: {self.out / 'last.pt'}")
        retries, scale = self.retries + 1, self.lr_scale * 0.5
        log.warning("divergence at step %d: %s; rolling back (retry %d/%d, lr x%.3g)", self.step, why, retries,
                    self.cfg.max_retries, scale)
        self.build(seed_offset=retries)
        last = self.out / "last.pt"
        if last.exists():
            self.restore(last)
        else:
            self.step = 0
        self.retries, self.lr_scale = retries, scale
        self.gen.manual_seed(self.cfg.seed + 7919 * retries)
        truncate_metrics(metrics_path, self.step)
        _append_jsonl(metrics_path, {"step": self.step, "event": "rollback", "reason": why, "retry": retries,
                                     "lr_scale": scale})


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only metric rows up to ``step`` (so a resumed run logs each step once)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if row.get("step", 0) <= step:
            keep.append(line)
    text = "".join(line + "\n" for line in keep)
    atomic_write(path, lambda f: f.write(text.encode()))


def check_out_dir(out: Path) -> None:
    """Fail early (nothing written) when ``out`` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out} cannot be created ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"--out {out} is not writable")


def train(cfg: TrainConfig | None, out: str | os.PathLike, *, device: torch.device | str = "cpu", resume: bool = False,
          data_dir: str | None = None, stop_at: int | None = None, progress: bool = True) -> Path:
    """Train ``cfg`` into ``out`` and return the path of ``final.pt``.

    Args:
        cfg: the run's full configuration.
        out: run directory (config.json, metrics.jsonl, last.pt, final.pt, samples.png).
        device: torch device.
        resume: continue from ``out/last.pt`` (its config wins).
        data_dir: where the data set files are.
        stop_at: stop (after saving last.pt) at this step; for tests and staged runs.
    """
    out = Path(out)
    device = torch.device(device)
    if resume:
        last = out / "last.pt"
        if not last.exists():
            raise UserError(f"nothing to resume: {last} does not exist")
        cfg = read_checkpoint(last)["config"]
    cfg.validate()
    trainer = Trainer(cfg, out, device, data_dir)  # loads data: fails before anything is written
    check_out_dir(out)
    if resume:
        trainer.restore(out / "last.pt")
        truncate_metrics(out / "metrics.jsonl", trainer.step)
        log.info("resumed %s at step %d", out, trainer.step)
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    atomic_write(out / "config.json", lambda f: f.write(json.dumps(cfg.to_dict(), indent=2).encode()))
    trainer.run(stop_at=stop_at, progress=progress)
    if trainer.step < cfg.iters:
        return out / "last.pt"
    acc = evaluate(trainer.model, trainer.test_data, device)
    final_metrics = {"test_acc": acc, "step": trainer.step, "retries": trainer.retries}
    if trainer.buffer is not None:
        with torch.no_grad():
            model = trainer.model.eval()
            x, _ = trainer.test_data.batch(slice(0, 500))
            final_metrics["test_energy"] = float(model.energy(x.to(device)).mean())
            final_metrics["buffer_energy"] = float(model.energy_z(trainer.buffer.buffer[:500]).mean())
        save_grid(to_pixels(trainer.buffer.buffer[:100]), out / "samples.png")
    _append_jsonl(out / "metrics.jsonl", {"step": trainer.step, "event": "final", **final_metrics})
    trainer.save("final.pt", metrics=final_metrics)
    log.info("%s: test accuracy %.4f -> %s", cfg.objective, acc, out / "final.pt")
    return out / "final.pt"
