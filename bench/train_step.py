"""JEM training-step throughput: robust-jem's trainer against a loop written like the JEM reference's
``train_wrn_ebm.py``, same model, batch, SGLD steps and device, timed in one process, interleaved.

    .venv/bin/python bench/train_step.py                      # quick small CNN (Fashion-MNIST shape), CPU
    python bench/train_step.py --device cuda --paper          # WRN-28-10, CIFAR shape, 20 SGLD steps, batch 64

Timed loops (each its own model copy from the same initial weights, its own optimiser and buffer):

* ``reference``: the reference's step (wgrathwohl/JEM, train_wrn_ebm.py): a replay buffer on the host indexed
  with ``torch.randint`` and written back with ``.cpu()``, chains re-initialised on the host then moved to the
  device, SGLD as ``x_k.data += lr * grad + std * randn_like`` with ``autograd.grad(..., retain_graph=True)``,
  separate forward passes for f(x_data), f(x_sample) and the classifier batch (a second data batch, as its
  second loader gives), data noise added on the host, ``L.abs().item()`` every step, fp32, Adam.
* ``ours[+options]``: ``robust_jem.train.Trainer.batch`` + ``Trainer.train_step`` (the loop's own step code)
  with the metric window kept on the device. ``ours`` is the trainer's defaults (fp32, channels_last, fused
  Adam, prefetch); options switch one thing: ``bf16`` autocast, ``compile`` (torch.compile of the backbone),
  ``nocl`` (NCHW instead of channels_last), ``nofused`` (foreach Adam instead of the fused kernel),
  ``noprefetch`` (synchronous batch gather instead of the background-thread / pinned-memory prefetcher).

Each repeat times ``--steps`` steps of every loop, in a rotating order (so load from other processes hits all
loops alike); the median per-step time over repeats is reported after ``--warmup`` steps. FLOPs of one step
are counted with ``torch.utils.flop_counter`` (matmul/conv FLOPs, forward and backward), MFU against the
peak named in the output. Results: ``bench/results/train_step-<device>[-<model>].{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.provenance import device_name, git_sha, now  # noqa: E402
from robust_jem.config import TrainConfig, preset_config  # noqa: E402
from robust_jem.data import ImageDataset, load_dataset  # noqa: E402
from robust_jem.errors import UserError  # noqa: E402
from robust_jem.model import EnergyModel  # noqa: E402
from robust_jem.objectives import Context, jem_loss  # noqa: E402
from robust_jem.train import Trainer, _Window  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step_parts import (GPU_PEAKS, H100_MEASURED_BF16, ReferenceLoop, count_flops,  # noqa: E402
                              matmul_peak, paper_step_flops)

# ------------------------------------------------------------------------------------------------
# our trainer
# ------------------------------------------------------------------------------------------------
class OursLoop:
    """``Trainer.batch`` + ``Trainer.train_step``, metrics accumulated on the device as ``Trainer.run`` does."""

    def __init__(self, cfg: TrainConfig, data: tuple[ImageDataset, ImageDataset], device: torch.device,
                 init: dict[str, torch.Tensor], out: Path) -> None:
        self.trainer = Trainer(cfg, out, device, data=data)
        self.trainer.model.load_state_dict(init)
        self.window = _Window()

    def step(self) -> None:
        t = self.trainer
        x, y = t.batch(t.step)
        loss, terms, _ = t.train_step(x, y)
        self.window.add(terms, loss)
        t.step += 1

    def flush(self) -> dict[str, float]:
        return self.window.read()


# ------------------------------------------------------------------------------------------------
# measurement helpers (FLOP counting and the peaks are in train_step_parts.py)
# ------------------------------------------------------------------------------------------------
def synthetic_data(cfg: TrainConfig, n: int, seed: int) -> ImageDataset:
    """Random uint8 images and labels of the config's shape (step cost does not depend on the pixels)."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    images = torch.randint(0, 256, (n, m.in_channels, m.image_size, m.image_size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, m.n_classes, (n,), generator=g)
    return ImageDataset("synthetic", "train", images, labels, tuple(str(i) for i in range(m.n_classes)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_for(device: torch.device, name: str, precision: str, args: argparse.Namespace) -> tuple[float | None, str]:
    override = args.peak_bf16 if precision == "bf16" else args.peak_fp32
    if override:
        return override, "given on the command line"
    if device.type == "cpu":
        return matmul_peak(precision), (f"best of 10 torch.mm 1024^3 {precision} in this run, "
                                        f"{torch.get_num_threads()} threads")
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, name):
            kind = "bf16 dense tensor core" if precision == "bf16" else "TF32 dense tensor core (cuDNN fp32 convs)"
            return peaks[precision], f"{pattern} spec sheet, {kind}"
    return None, "unknown device: pass --peak-bf16/--peak-fp32"


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def fmt_time(seconds: float) -> str:
    if seconds >= 86400 * 2:
        return f"{seconds / 86400:.1f} d"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def parse_variant(name: str) -> dict[str, Any]:
    if name == "reference":
        return {"reference": True}
    tokens = [t for t in name.split("+") if t and t != "ours"]
    bad = set(tokens) - {"bf16", "compile", "nocl", "nofused", "noprefetch"}
    if bad:
        raise UserError(f"unknown variant option(s) {', '.join(sorted(bad))} in {name!r}")
    return {"reference": False, "bf16": "bf16" in tokens, "channels_last": "nocl" not in tokens,
            "compile": "compile" in tokens, "fused_adam": "nofused" not in tokens,
            "prefetch": "noprefetch" not in tokens}


def bf16_check(cfg: TrainConfig, data: tuple[ImageDataset, ImageDataset], device: torch.device,
               init: dict[str, torch.Tensor], out: Path) -> dict[str, float]:
    """One JEM loss + gradient at the same weights, batch, buffer and noise draws, in fp32 and in bf16."""
    res = {}
    grads, terms_by, chains = {}, {}, {}
    for prec in ("fp32", "bf16"):
        t = Trainer(replace(cfg, bf16=prec == "bf16"), out, device, data=data)
        t.model.load_state_dict(init)
        x, y = t.batch(0)
        ctx = Context(t.cfg, t.model, t.gen, t.buffer, t.autocast, net=t.train_net, sample_net=t.sample_net)
        before = t.buffer.buffer.clone()  # type: ignore[union-attr]
        loss, terms = jem_loss(ctx, x, y)
        loss.backward()
        grads[prec] = torch.cat([p.grad.flatten() for p in t.model.parameters()]).double()
        terms_by[prec] = {k: float(v) for k, v in dict(terms, loss=loss.detach()).items()}
        after = t.buffer.buffer  # type: ignore[union-attr]
        rows = (after != before).flatten(1).any(1)  # the chains this step advanced (same draws in both)
        chains[prec] = (rows, after.double())
    g32, g16 = grads["fp32"], grads["bf16"]
    res["grad_cosine"] = float(F.cosine_similarity(g32, g16, dim=0))
    res["grad_rel_l2"] = float((g32 - g16).norm() / g32.norm())
    rows = chains["fp32"][0] | chains["bf16"][0]
    c32, c16 = chains["fp32"][1][rows], chains["bf16"][1][rows]
    res["chain_rel_l2_after_sgld"] = float((c32 - c16).norm() / c32.norm())
    for k in ("loss", "ce", "e_data", "e_sample"):
        res[f"{k}_fp32"], res[f"{k}_bf16"] = terms_by["fp32"][k], terms_by["bf16"][k]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--paper", action="store_true",
                    help="the cifar10-paper preset's model and sampler: WRN-28-10, 3x32x32, batch 64, 20 SGLD steps")
    ap.add_argument("--arch", choices=["small", "wrn"], default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="[the preset's: 64]")
    ap.add_argument("--sgld-steps", type=int, default=None, help="[quick: 5, paper: 20]")
    ap.add_argument("--variants", default=None,
                    help="comma list: reference, ours (the trainer's defaults), and ours with +bf16 +compile "
                         "+nocl +nofused +noprefetch [cpu: reference,ours,nocl,nofused,noprefetch,bf16; cuda: "
                         "reference,ours,nocl,nofused,noprefetch,bf16,bf16+compile]")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per loop per repeat")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first (compile happens here)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    ap.add_argument("--data", choices=["auto", "real", "synthetic"], default="auto",
                    help="real data set when it loads and fits the model, else synthetic uint8 images [auto]")
    ap.add_argument("--bf16-check", action=argparse.BooleanOptionalAction, default=True,
                    help="compare one fp32 and one bf16 JEM step at identical state")
    ap.add_argument("--peak-fp32", type=float, default=None, help="peak FLOP/s for fp32 MFU [device table]")
    ap.add_argument("--peak-bf16", type=float, default=None, help="peak FLOP/s for bf16 MFU [device table]")
    ap.add_argument("--out", default=str(ROOT / "bench/results"), help="directory for the JSON and markdown")
    ap.add_argument("--tag", default=None, help="file name suffix [device and model]")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench: CUDA requested but not available")
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # the reference sets it; it applies to every loop here
    dev_name = device_name(device)
    torch.manual_seed(args.seed)  # the reference loop draws from the global RNG, as the original does

    # --- configuration: the preset's JEM step, without the CE warm start ---------------------------
    if args.paper:
        cfg = preset_config("cifar10-paper", "jem", "cifar10")
    else:
        cfg = preset_config("quick", "jem", "fashion-mnist")
    # the reference's sampler is unconstrained: no chain clamping (the quick preset clamps) in either loop
    over: dict[str, Any] = {"ce_warmup_iters": 0, "sgld_clamp": False, "model_arch": args.arch,
                            "model_depth": args.depth, "model_width": args.width, "batch_size": args.batch_size,
                            "sgld_steps": args.sgld_steps}
    cfg = preset_config(cfg.preset, "jem", cfg.dataset, **over)
    paper = preset_config("cifar10-paper", "jem", "cifar10")

    data_note = "synthetic uint8 images (random pixels and labels; the step's cost does not depend on them)"
    data: tuple[ImageDataset, ImageDataset] | None = None
    if args.data in ("auto", "real"):
        try:
            tr = load_dataset(cfg.dataset, "train", download=False)  # never the network
            data = (tr, load_dataset(cfg.dataset, "test", download=False))
            data_note = f"{cfg.dataset} (real, in memory)"
        except UserError as exc:
            if args.data == "real":
                raise SystemExit(f"bench: {exc}")
    if data is None:
        syn = synthetic_data(cfg, 4096, args.seed)
        data = (syn, syn)

    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
    elif device.type == "cuda":
        names = ["reference", "ours", "nocl", "nofused", "noprefetch", "bf16", "bf16+compile"]
    else:
        names = ["reference", "ours", "nocl", "nofused", "noprefetch", "bf16"]
    names = ["ours" if n in ("ours", "") else n for n in names]
    specs = {n: parse_variant(n) for n in names}

    load_start = loadavg()
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    init = Trainer(cfg, tmp, torch.device("cpu"), data=data).model.state_dict()  # same start for every loop
    loops: dict[str, Any] = {}
    for n, spec in specs.items():
        if spec["reference"]:
            net = EnergyModel(cfg.model).net
            net.load_state_dict({k[len("net."):]: v for k, v in init.items()})
            loops[n] = ReferenceLoop(net, cfg, data[0], device)
        else:
            vcfg = replace(cfg, bf16=spec["bf16"], channels_last=spec["channels_last"], compile=spec["compile"],
                           fused_adam=spec["fused_adam"], prefetch=spec["prefetch"])
            loops[n] = OursLoop(vcfg, data, device, copy.deepcopy(init), tmp)

    # --- FLOPs of one step (uncompiled loops; compiled code is opaque to the counter) -------------
    flops: dict[str, int] = {}
    ours_flops = None
    for n, loop in loops.items():
        if specs[n]["reference"]:
            flops[n] = count_flops(loop.step)
        elif not specs[n]["compile"] and ours_flops is None:
            ours_flops = count_flops(loop.step)
    if ours_flops is None:
        ours_flops = paper_step_flops(cfg)
    for n in loops:
        flops.setdefault(n, ours_flops)
    paper_flops = paper_step_flops(paper)

    # --- warm-up, then interleaved timing ----------------------------------------------------------
    for n, loop in loops.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            loop.step()
        sync(device)
        print(f"warm-up {n}: {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in loops}
    cpu_times: dict[str, list[float]] = {n: [] for n in loops}  # process CPU time: robust to other processes
    order = list(loops)
    for r in range(args.repeats):
        rot = order[r % len(order):] + order[: r % len(order)]
        for n in rot:
            loop = loops[n]
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                loop.step()
            if isinstance(loop, OursLoop):
                loop.flush()  # the trainer reads its metric window once per log interval: one host sync
            sync(device)
            times[n].append((time.perf_counter() - t0) / args.steps)
            cpu_times[n].append((time.process_time() - c0) / args.steps)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in order),
              flush=True)
    wall = time.monotonic() - t_start
    load_end = loadavg()

    check = None
    if args.bf16_check and "jem" == cfg.objective:
        check = bf16_check(cfg, data, device, init, tmp)
    shutil.rmtree(tmp, ignore_errors=True)

    # --- report ------------------------------------------------------------------------------------
    ref_name = "reference" if "reference" in loops else None
    ref_t = statistics.median(times[ref_name]) if ref_name else None
    ref_c = statistics.median(cpu_times[ref_name]) if ref_name and device.type == "cpu" else None
    is_paper_model = cfg.model == paper.model and cfg.batch_size == paper.batch_size \
        and cfg.sgld.steps == paper.sgld.steps
    rows = []
    for n in order:
        med = statistics.median(times[n])
        prec = "bf16" if specs[n].get("bf16") else "fp32"
        peak, peak_src = peak_for(device, dev_name, prec, args)
        achieved = flops[n] / med
        if is_paper_model:
            proj = med * paper.iters
            proj_how = "measured step time x iters"
        else:  # scale by the algorithm's FLOPs (ours), so the reference's extra pass keeps its cost
            proj = med * paper_flops / ours_flops * paper.iters
            proj_how = ("measured step time x (paper-step FLOPs / this config's step FLOPs) x iters: an "
                        "extrapolation that assumes the same efficiency at WRN-28-10 scale")
        rows.append({
            "loop": n, "precision": prec, "median_step_s": med, "steps_per_s": 1 / med,
            "step_times_s": times[n], "speedup_vs_reference": (ref_t / med) if ref_t else None,
            "median_step_cpu_s": statistics.median(cpu_times[n]), "step_cpu_times_s": cpu_times[n],
            "speedup_vs_reference_cpu_time": (ref_c / statistics.median(cpu_times[n])) if ref_c else None,
            "flops_per_step": flops[n], "achieved_tflops": achieved / 1e12, "peak_flops": peak,
            "peak_source": peak_src, "mfu": (achieved / peak) if peak else None,
            # CPU only: the MFU had this process had its threads to itself (step time = CPU time / threads)
            "mfu_from_cpu_time": (flops[n] / (statistics.median(cpu_times[n]) / torch.get_num_threads()) / peak)
            if peak and device.type == "cpu" else None,
            "paper_schedule_projection_s": proj, "projection_method": proj_how,
        })
    result = {
        "bench": "train_step", "created": now(), "git_sha": git_sha(), "torch": torch.__version__,
        "device": str(device), "device_name": dev_name, "threads": torch.get_num_threads(),
        "note": ("CPU shared with whatever else runs on the machine (see the load averages): loops are "
                 "interleaved in rotating order so contention hits each alike; absolute times are noisy, "
                 "ratios less so") if device.type == "cpu" else "single GPU; loops interleaved",
        "loadavg_start": load_start, "loadavg_end": load_end, "wall_s": wall,
        "config": {"model": cfg.model.__dict__ | {"channels": list(cfg.model.channels)},
                   "batch_size": cfg.batch_size, "sgld": cfg.sgld.__dict__, "data_noise": cfg.data_noise,
                   "lr": cfg.lr, "preset": cfg.preset},
        "data": data_note, "repeats": args.repeats, "steps_per_repeat": args.steps, "warmup_steps": args.warmup,
        "flop_counting": ("torch.utils.flop_counter (conv/matmul, forward + backward) on one real step of each "
                          "uncompiled loop; our variants share the algorithm, so one count serves them all. The "
                          "reference's count is higher: it runs three forward/backward passes of B examples "
                          "(data, samples, a second classifier batch) where ours runs one of 2B."),
        "paper_schedule": {"preset": "cifar10-paper", "iters": paper.iters, "flops_per_step": paper_flops,
                           "model": f"{paper.model.arch}-{paper.model.depth}-{paper.model.width}",
                           "batch_size": paper.batch_size, "sgld_steps": paper.sgld.steps},
        "h100_measured_bf16_flops": H100_MEASURED_BF16,
        "loops": rows, "bf16_check": check,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", ("cpu" if device.type == "cpu" else f"cuda-{dev_name}").lower()).strip("-")
    m = cfg.model
    model_tag = "" if (m.arch == "small" and not args.paper) else f"-{m.arch}-{m.depth}-{m.width}"
    tag = args.tag or f"{slug}{model_tag}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_step-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / f"train_step-{tag}.md").write_text(md)
    print(md)
    if ref_t:
        ours = [row for row in rows if row["loop"] != "reference"]
        best = max(ours, key=lambda row: row["speedup_vs_reference"], default=None)
        base = next((row for row in ours if row["loop"] == "ours"), None)
        if base:
            print(f"ratio: our trainer (defaults) is {base['speedup_vs_reference']:.2f}x the reference-style step"
                  + (f" ({base['speedup_vs_reference_cpu_time']:.2f}x by process CPU time)" if ref_c else ""))
        if best:
            print(f"ratio: best option set '{best['loop']}' is {best['speedup_vs_reference']:.2f}x"
                  + (f" ({best['speedup_vs_reference_cpu_time']:.2f}x by process CPU time)" if ref_c else ""))
    print(f"wrote {out / f'train_step-{tag}.json'} and .md")
    return 0


def markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    m = c["model"]
    model = f"{m['arch']}" + (f"-{m['depth']}-{m['width']}" if m["arch"] == "wrn" else f" CNN {m['channels']}")
    lines = [
        f"# JEM train-step throughput — {r['device_name']} ({r['device']}, {r['threads']} threads)",
        "",
        f"{r['created']}, git {r['git_sha']}, torch {r['torch']}. Model {model}, input "
        f"{m['in_channels']}x{m['image_size']}x{m['image_size']}, batch {c['batch_size']}, "
        f"{c['sgld']['steps']} SGLD steps, buffer {c['sgld']['buffer_size']}. Data: {r['data']}.",
        f"Median over {r['repeats']} repeats of {r['steps_per_repeat']} steps after {r['warmup_steps']} warm-up "
        f"steps; loops interleaved. {r['note']}. Load average at start {r['loadavg_start']}, end "
        f"{r['loadavg_end']}; bench wall time {r['wall_s']:.0f} s.",
        "",
        "| loop | precision | ms/step | steps/s | vs reference | vs reference (process CPU time) | GFLOP/step | "
        "achieved TFLOP/s | MFU | MFU from CPU time | paper schedule (projected) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["loops"]:
        sp = f"{row['speedup_vs_reference']:.2f}x" if row["speedup_vs_reference"] else "-"
        spc = f"{row['speedup_vs_reference_cpu_time']:.2f}x" if row["speedup_vs_reference_cpu_time"] else "-"
        mfu = f"{100 * row['mfu']:.1f} %" if row["mfu"] is not None else "-"
        mfu_c = f"{100 * row['mfu_from_cpu_time']:.1f} %" if row["mfu_from_cpu_time"] is not None else "-"
        lines.append(f"| {row['loop']} | {row['precision']} | {1e3 * row['median_step_s']:.1f} | "
                     f"{row['steps_per_s']:.2f} | {sp} | {spc} | {row['flops_per_step'] / 1e9:.2f} | "
                     f"{row['achieved_tflops']:.4f} | {mfu} | {mfu_c} | "
                     f"{fmt_time(row['paper_schedule_projection_s'])} |")
    peaks = {(row["precision"], row["peak_flops"], row["peak_source"]) for row in r["loops"]}
    if r["device"] == "cpu":
        lines += ["", "MFU from CPU time: FLOPs / (process CPU seconds per step / threads) / peak, i.e. the MFU with "
                  "the cores to ourselves; it is what the shared machine's wall clock cannot show."]
    lines += ["", "Peaks used for MFU: " + "; ".join(
        f"{p} {v / 1e12:.3g} TFLOP/s ({s})" if v else f"{p}: none ({s})" for p, v, s in sorted(peaks, key=str)) + "."]
    ps = r["paper_schedule"]
    lines += [f"Paper schedule: cifar10-paper JEM, {ps['model']}, batch {ps['batch_size']}, {ps['sgld_steps']} SGLD "
              f"steps, {ps['iters']} iterations, {ps['flops_per_step'] / 1e12:.1f} TFLOP per step (counted on the "
              f"meta device); projection: {r['loops'][0]['projection_method']}.",
              "", f"FLOPs: {r['flop_counting']}"]
    if r["bf16_check"]:
        b = r["bf16_check"]
        lines += ["", "bf16 vs fp32 at identical state (same weights, batch, buffer and noise draws, one JEM step): "
                  f"gradient cosine {b['grad_cosine']:.5f}, relative L2 gradient difference {b['grad_rel_l2']:.3g}, "
                  f"SGLD chains relative difference {b['chain_rel_l2_after_sgld']:.3g}; loss {b['loss_fp32']:.5f} vs "
                  f"{b['loss_bf16']:.5f}, E(data) {b['e_data_fp32']:.4f} vs {b['e_data_bf16']:.4f}, E(samples) "
                  f"{b['e_sample_fp32']:.4f} vs {b['e_sample_bf16']:.4f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
