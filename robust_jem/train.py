"""One training loop for every objective: JEM, plain CE, PGD adversarial training, Gaussian augmentation, JEM-AT.

The loop is shared; each objective contributes one loss function ``loss(ctx, x, y) -> (loss, terms)``
(:mod:`robust_jem.objectives`).
Resumable (``last.pt`` at log boundaries, at least every ``save_every_s`` seconds), with a divergence
guard that rolls back to the last good checkpoint and retries with a lower learning rate and a new
sampler seed a bounded number of times. Under ``torchrun`` the same loop runs as DDP (see
:mod:`robust_jem.distributed` for the batch, buffer and checkpoint conventions).
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
from tqdm.auto import tqdm

from infra.interrupt import Interrupted, StopRequest, sigterm_as_interrupt, stop_at_safe_points
from infra.io import atomic_write, check_out_dir
from infra.precision import resolve_bf16
from infra.randomness import derive_seed, generator
from infra.records import append_row

from .checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from .config import PURIFIER_OBJECTIVES, SAMPLING_OBJECTIVES, TrainConfig
from .data import ImageDataset, Prefetcher, load_dataset
from .distributed import SINGLE, DistContext, shard, shard_size
from .errors import TrainingDiverged, UserError  # noqa: F401  (TrainingDiverged: raised here, re-exported)
from .images import save_grid
from .model import EnergyModel, to_internal, to_pixels
from .objectives import LOSSES, Context, ce_loss
from .runs import existing_run, truncate_metrics
from .sgld import GaussianInit, ReplayBuffer

log = logging.getLogger(__name__)



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
            g = generator(derive_seed(self.seed, "batch-order", epoch))
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

    def state(self) -> dict[str, Any]:
        """The window so far, exactly (float32 sums as Python floats), for a checkpoint taken mid-window."""
        return {"count": self.count, "sums": {k: float(v) for k, v in self.sums.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, device: torch.device) -> "_Window":
        if not state:
            return cls()
        sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in state["sums"].items()}
        return cls(sums, int(state["count"]))

    def read(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Window means (``reduce`` combines the stacked sums across ranks first, e.g. an all-reduce mean)."""
        if not self.count:
            return {}
        vals = torch.stack(list(self.sums.values()))
        vals = (reduce(vals) if reduce is not None else vals).cpu().tolist()
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
    """State of one run: model, optimiser, sampler, generator, step; knows how to save and restore.

    Args:
        cfg, out, device, data_dir: as for :func:`train`.
        dist: this process's place in a ``torchrun`` job (:data:`robust_jem.distributed.SINGLE` when alone).
        data: (train, test) data sets to use instead of loading ``cfg.dataset`` (benchmarks, tests).
    """

    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device, data_dir: str | None = None, *,
                 dist: DistContext = SINGLE, data: tuple[ImageDataset, ImageDataset] | None = None) -> None:
        self.cfg, self.out, self.device, self.dist = cfg, out, device, dist
        if data is None:
            self.train_data = load_dataset(cfg.dataset, "train", data_dir)
            self.test_data = load_dataset(cfg.dataset, "test", data_dir)
        else:
            self.train_data, self.test_data = data
        c, h, w = self.train_data.shape
        m = cfg.model
        if (c, h) != (m.in_channels, m.image_size) or len(self.train_data.classes) != m.n_classes:
            raise UserError(f"data set {cfg.dataset} is {c}x{h}x{w} with {len(self.train_data.classes)} classes, "
                            f"the model expects {m.in_channels}x{m.image_size} with {m.n_classes}")
        if cfg.batch_size % dist.world:
            raise UserError(f"batch size {cfg.batch_size} is not divisible by the {dist.world} ranks "
                            f"(each rank trains on batch_size / world examples)")
        if cfg.objective in SAMPLING_OBJECTIVES and shard_size(cfg.sgld.buffer_size, dist.world - 1, dist.world) \
                < cfg.batch_size // dist.world:
            raise UserError(f"replay buffer of {cfg.sgld.buffer_size} split over {dist.world} ranks is smaller "
                            f"than the per-rank batch {cfg.batch_size // dist.world}")
        self.order = BatchOrder(len(self.train_data), cfg.batch_size, cfg.seed)
        self.loader = Prefetcher(self.host_batch, device, enabled=cfg.prefetch)
        self.step = 0
        self.lr_scale = 1.0
        self.retries = 0
        self.best_acc = 0.0
        self.window = _Window()  # metrics of the log window in progress (saved with last.pt)
        self.model: EnergyModel
        self.build(seed_offset=0)

    def build(self, seed_offset: int) -> None:
        cfg = self.cfg
        torch_gen = generator(cfg.seed)
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
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr_at(cfg, 0), weight_decay=cfg.weight_decay,
                                    **({"fused": True} if cfg.fused_adam else {"foreach": True}))
        self.gen = generator(self.gen_seed(seed_offset), self.device)
        self.buffer = None
        if cfg.objective in SAMPLING_OBJECTIVES:
            self.buffer = ReplayBuffer(shard_size(cfg.sgld.buffer_size, self.dist.rank, self.dist.world),
                                       self.train_data.shape, cfg.sgld.reinit_freq, device=self.device,
                                       generator=self.gen, init=self.informative_init())
        # The loss functions call these instead of the model's methods. Compiling/wrapping the backbone
        # leaves ``self.model`` (and so checkpoint state_dict keys) untouched.
        net: torch.nn.Module = self.model.net
        self.sample_net = torch.compile(net) if cfg.compile else net
        self.train_net = self.sample_net
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.train_net = torch.compile(ddp) if cfg.compile else ddp

    def gen_seed(self, seed_offset: int) -> int:
        """Seed of this rank's generator for retry ``seed_offset`` (rank 0: the single-process seed)."""
        return derive_seed(self.cfg.seed, "sampler", seed_offset, self.dist.rank)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def host_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the deterministic batch of ``step``, on the host."""
        idx = self.order.indices(step)
        if self.dist.enabled:
            idx = idx[self.dist.rank::self.dist.world]
        return self.train_data.batch(idx)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the deterministic batch of ``step``, on the device (prefetched)."""
        x, y = self.loader.get(step)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], Context]:
        """One optimiser step at ``self.step`` (the step counter is advanced by the caller); no host sync."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.step, self.lr_scale)
        ctx = Context(cfg, self.model, self.gen, self.buffer, self.autocast,
                      phase="ce-warmup" if self.step < cfg.ce_warmup_iters else "main",
                      net=self.train_net, sample_net=self.sample_net)
        loss, terms = (ce_loss if ctx.phase == "ce-warmup" else LOSSES[cfg.objective])(ctx, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss, terms, ctx

    # --- persistence -----------------------------------------------------------------------------
    def save(self, name: str, metrics: dict[str, Any] | None = None) -> Path:
        """Write ``out/name``. Distributed: a collective (buffer shards and generator states gathered in
        rank order), written by rank 0 only."""
        path = self.out / name
        d = self.dist
        buffer = None if self.buffer is None else d.gather_rows(self.buffer.buffer)
        rng: dict[str, Any] = {"gen": self.gen.get_state()}
        states = d.gather_objects(self.gen.get_state()) if d.enabled else None
        if d.is_main:
            if states is not None:
                rng["gen_ranks"] = states
            state = {"lr_scale": self.lr_scale, "retries": self.retries, "best_acc": self.best_acc,
                     "window": self.window.state()}
            if d.enabled:
                state["world"] = d.world
            save_checkpoint(
                path, cfg=self.cfg, model=self.model, step=self.step, classes=self.train_data.classes,
                optimizer=self.opt.state_dict(), buffer=buffer, rng=rng, metrics=metrics, state=state,
            )
        d.barrier()
        return path

    def restore(self, path: Path) -> None:
        ckpt = read_checkpoint(path, map_location="cpu")
        if ckpt["config"].model != self.cfg.model or ckpt["config"].objective != self.cfg.objective:
            raise UserError(f"{path} was trained with another architecture or objective than this run")
        self.model.load_state_dict(model_from_checkpoint(ckpt, path).state_dict())
        if ckpt.get("optimizer"):
            self.opt.load_state_dict(ckpt["optimizer"])
        d = self.dist
        if self.buffer is not None and ckpt.get("buffer") is not None:
            buf = ckpt["buffer"]
            if d.enabled:  # this rank's shard of the full buffer, whatever world size wrote it
                buf = shard(buf, d.rank, d.world).clone()
                if buf.shape[0] < self.cfg.batch_size // d.world:
                    raise UserError(f"{path}: replay buffer of {ckpt['buffer'].shape[0]} is too small for "
                                    f"{d.world} ranks")
            self.buffer.load_state_dict({"buffer": buf})
        rng = ckpt.get("rng", {})
        ranks = rng.get("gen_ranks")
        if ranks is not None and len(ranks) == d.world:
            self.gen.set_state(ranks[d.rank])
        elif d.is_main and "gen" in rng:
            self.gen.set_state(rng["gen"])
        else:  # another world size wrote it: a fresh, deterministic stream for this rank
            self.gen.manual_seed(derive_seed(self.cfg.seed, "sampler-reshard", d.rank, int(ckpt["step"])))
            log.info("rank %d: sampler generator reseeded (checkpoint written by another world size)", d.rank)
        self.step = int(ckpt["step"])
        st = ckpt["state"]
        self.lr_scale, self.retries = st.get("lr_scale", 1.0), st.get("retries", 0)
        self.best_acc = st.get("best_acc", 0.0)
        self.window = _Window.from_state(st.get("window"), self.device)

    def informative_init(self) -> GaussianInit | None:
        """The buffer's informative init (fitted once to the training set; a pure function of it), or None."""
        if self.cfg.sgld.init == "uniform":
            return None
        if getattr(self, "_init", None) is None:
            z = to_internal(self.train_data.x)
            labels = self.train_data.labels if self.cfg.sgld.init == "class-gaussian" else None
            self._init = GaussianInit.fit(z, labels)
        return self._init

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, stop_at: int | None = None, progress: bool = True, stop: StopRequest | None = None) -> bool:
        """Train up to ``stop_at`` (default: the end). Returns True when ``stop`` was requested: the loop then
        ends between two steps, with every piece of state consistent (the caller saves it)."""
        cfg, d = self.cfg, self.dist
        metrics_path = self.out / "metrics.jsonl"
        end = cfg.iters if stop_at is None else min(stop_at, cfg.iters)
        last_save = time.monotonic()
        t_window = time.monotonic()
        steps_window = 0
        bar = tqdm(total=cfg.iters, initial=self.step, desc=f"train {cfg.objective}",
                   disable=not progress or not d.is_main, dynamic_ncols=True)
        while self.step < end:
            x, y = self.batch(self.step)
            lr = lr_at(cfg, self.step, self.lr_scale)
            loss, terms, ctx = self.train_step(x, y)
            self.window.add(terms, loss)
            self.step += 1
            steps_window += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == end:
                row = self.window.read(reduce=d.all_reduce_mean)  # the one host sync per log window
                elapsed = time.monotonic() - t_window
                row.update(step=self.step, lr=lr, it_per_s=steps_window / max(elapsed, 1e-9), phase=ctx.phase)
                t_window, steps_window = time.monotonic(), 0
                why = diverged(row, self.best_acc, cfg)
                save_due = time.monotonic() - last_save >= cfg.save_every_s or self.step == end
                if d.enabled:  # every rank takes the same roll-back and save decisions
                    any_diverged, save_due = d.any([why is not None, save_due], self.device)
                    if any_diverged and why is None:
                        why = "divergence detected on another rank"
                if why:
                    self.recover(why, metrics_path)
                    continue
                self.best_acc = max(self.best_acc, row.get("acc", 0.0))
                if d.is_main:
                    append_row(metrics_path, row)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "acc", "e_data", "e_sample") if k in row})
                if save_due:
                    self.save("last.pt")
                    last_save = time.monotonic()
            if stop:
                bar.close()
                return True
        bar.close()
        return False

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
            self.step, self.window = 0, _Window()
        self.retries, self.lr_scale = retries, scale
        self.gen.manual_seed(self.gen_seed(retries))
        if self.dist.is_main:
            truncate_metrics(metrics_path, self.step)
            append_row(metrics_path, {"step": self.step, "event": "rollback", "reason": why, "retry": retries,
                                         "lr_scale": scale})


def train(cfg: TrainConfig | None, out: str | os.PathLike, *, device: torch.device | str = "cpu", resume: bool = False,
          data_dir: str | None = None, stop_at: int | None = None, progress: bool = True,
          dist: DistContext = SINGLE) -> Path:
    """Train ``cfg`` into ``out`` and return the path of ``final.pt`` (``last.pt`` when ``stop_at`` comes first).

    A folder that already holds this config's run is finished (returns its ``final.pt``) or resumed from its
    ``last.pt``; one that holds another config's run is refused. The first SIGINT / SIGTERM stops the run
    between two steps and writes ``last.pt`` there (a resumed run then ends bit-identical to an uninterrupted
    one); :class:`infra.interrupt.Interrupted` says what was kept.

    Args:
        cfg: the run's full configuration (None with ``resume``).
        out: run directory (config.json, metrics.jsonl, last.pt, final.pt, samples.png).
        device: torch device.
        resume: continue from ``out/last.pt`` (its config wins).
        data_dir: where the data set files are.
        stop_at: stop (after saving last.pt) at this step; for tests and staged runs.
        dist: the ``torchrun`` job this process belongs to (:func:`robust_jem.distributed.launch`); DDP
            when its world size is above 1, with only rank 0 writing files.
    """
    out = Path(out)
    device = torch.device(device)
    if resume:
        last = out / "last.pt"
        if not last.exists():
            raise UserError(f"nothing to resume: {last} does not exist")
        cfg = read_checkpoint(last)["config"]
    cfg.validate()
    if cfg.model.norm != "none":
        raise UserError("batch-norm models are imported (import-jem) and evaluated in eval mode, not trained here: "
                        "SGLD samples would update the running statistics")
    cfg = replace(cfg, bf16=resolve_bf16(cfg.bf16, device, "training"))  # the config written is what runs
    if not resume:
        found = existing_run(cfg, out)
        if found == "finished":
            log.info("%s already holds this run, finished: %s (nothing to do)", out, out / "final.pt")
            return out / "final.pt"
        if found == "resume":
            log.info("%s holds this run, unfinished: resuming from last.pt", out)
            resume = True
    trainer = Trainer(cfg, out, device, data_dir, dist=dist)  # loads data: fails before anything is written
    check_out_dir(out)
    if resume:
        trainer.restore(out / "last.pt")
        if dist.is_main:
            truncate_metrics(out / "metrics.jsonl", trainer.step)
        log.info("resumed %s at step %d", out, trainer.step)
    elif dist.is_main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if dist.is_main:
        atomic_write(out / "config.json", lambda f: f.write(json.dumps(cfg.to_dict(), indent=2).encode()))
        init = trainer.informative_init()
        if init is not None:  # the fitted init, stored with the run
            atomic_write(out / "init.pt", lambda f: torch.save(init.state_dict(), f))
    try:
        if dist.enabled:  # every rank would have to stop at the same step: the periodic last.pt is what is kept
            with sigterm_as_interrupt():
                stopped = trainer.run(stop_at=stop_at, progress=progress)
        else:
            with stop_at_safe_points() as stop:
                stopped = trainer.run(stop_at=stop_at, progress=progress, stop=stop)
    except KeyboardInterrupt:  # a second Ctrl-C, or a signal under torchrun: state mid-step, not saved
        last = out / "last.pt"
        kept = (f"{last} from step {read_checkpoint(last)['step']} of {cfg.iters} (the steps since then are lost; "
                f"the run resumes from it)") if last.exists() else "nothing: no last.pt had been written yet"
        raise Interrupted(kept) from None
    finally:
        trainer.loader.close()
    if stopped:
        trainer.save("last.pt")
        kept = f"{out / 'last.pt'} at step {trainer.step} of {cfg.iters} (the run resumes from it)"
        log.warning("stopped: %s", kept)
        raise Interrupted(kept)
    if trainer.step < cfg.iters:
        return out / "last.pt"
    final_metrics: dict[str, Any] = {}
    if dist.is_main:  # the other ranks wait in save()'s gather
        acc = evaluate(trainer.model, trainer.test_data, device)
        final_metrics = {"test_acc": acc, "step": trainer.step, "retries": trainer.retries}
        if trainer.buffer is not None:  # rank 0's shard: the first chains of the full buffer
            with torch.no_grad():
                model = trainer.model.eval()
                x, _ = trainer.test_data.batch(slice(0, 500))
                final_metrics["test_energy"] = float(model.energy(x.to(device)).mean())
                final_metrics["buffer_energy"] = float(model.energy_z(trainer.buffer.buffer[:500]).mean())
            save_grid(to_pixels(trainer.buffer.buffer[:100]), out / "samples.png")
        append_row(out / "metrics.jsonl", {"step": trainer.step, "event": "final", **final_metrics})
    trainer.save("final.pt", metrics=final_metrics)
    if dist.is_main:
        if cfg.objective in PURIFIER_OBJECTIVES:  # its logits are no classes: its energies say what it learnt
            log.info("%s: energy %.3g on test images, %.3g on its buffer -> %s", cfg.objective,
                     final_metrics["test_energy"], final_metrics["buffer_energy"], out / "final.pt")
        else:
            log.info("%s: test accuracy %.4f -> %s", cfg.objective, final_metrics["test_acc"], out / "final.pt")
    return out / "final.pt"
