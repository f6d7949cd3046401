"""Attack throughput: batched through-chain PGD vs a one-image-at-a-time loop (JEM reference style) vs
torchattacks PGD on the bare network, with the FLOPs each PGD step costs.

    .venv/bin/python bench/attack_throughput.py [--checkpoint runs/quick-jem/final.pt] [--device auto]

Three ways to run the same L∞ PGD (same ε, steps, step size, random start) on the same weights:

* ``batched``: ``attacks.white.PGD`` (torchattacks PGD) on ``RefinedClassifier(k, n_chains)``, a batch of
  images at once, for ``grad_mode`` bpda and full;
* ``loop``: one image at a time, the refined logits written like ``DummyModel.refined_logits`` in the
  JEM reference's ``attack_model.py`` (example-major duplication, ``x_k.data +=`` SGLD updates, so the
  gradient flows as BPDA) and a plain PGD loop per image, as foolbox ran it there;
* ``bare``: ``torchattacks.PGD`` on the network without chain or copies;
* ``batched_*_bf16`` / ``batched_bpda_compile``: the batched attack with the refined classifier under bf16
  autocast / with its backbone torch.compile'd (compilation happens in the untimed warm-up call).

Timed is the generation of adversarial examples only (no eval draws), after one warm-up call each. The
FLOPs of one PGD step per image come from ``torch.utils.flop_counter`` so that the chain's slowdown can be
compared with its extra arithmetic. Results: ``bench/results/attack_throughput-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchattacks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.provenance import device_name, file_sha256, git_sha, now  # noqa: E402
from attacks.white import PGD  # noqa: E402
from robust_jem import EnergyModel, ModelConfig, RefinedClassifier, load, load_dataset  # noqa: E402
from robust_jem.model import to_internal  # noqa: E402


# ------------------------------------------------------------------------------------------------
# the reference's way (a faithful re-creation for timing only; it is the counter-example of the style)
# ------------------------------------------------------------------------------------------------
def reference_refined_logits(model: EnergyModel, x01: torch.Tensor, n_steps: int, n_dup: int, sigma: float,
                             sgld_sigma: float) -> torch.Tensor:
    """``DummyModel.refined_logits`` of JEM's attack_model.py on one batch (step size 1, as there)."""
    x = to_internal(x01)
    xs = x.size()
    dup = x.view(xs[0], 1, *xs[1:]).repeat(1, n_dup, 1, 1, 1).view(xs[0] * n_dup, *xs[1:])
    x_k = dup + torch.randn_like(dup) * sigma
    for _ in range(n_steps):
        f_prime = torch.autograd.grad(-model.energy_z(x_k).sum(), [x_k], retain_graph=True)[0]
        x_k.data += f_prime + sgld_sigma * torch.randn_like(x_k)
    return model.logits_z(x_k).view(xs[0], n_dup, -1).mean(1)


def reference_loop(model: EnergyModel, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
                   n_steps: int, n_dup: int, sigma: float, sgld_sigma: float) -> torch.Tensor:
    """One image at a time: random start, ``steps`` sign-gradient steps, projection (per image, as foolbox
    was called per image in the reference)."""
    out = []
    for i in range(x.shape[0]):
        xi, yi = x[i:i + 1], y[i:i + 1]
        adv = (xi + torch.empty_like(xi).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            loss = F.cross_entropy(reference_refined_logits(model, adv, n_steps, n_dup, sigma, sgld_sigma), yi)
            (g,) = torch.autograd.grad(loss, adv)
            adv = torch.min(torch.max(adv.detach() + alpha * g.sign(), xi - eps), xi + eps).clamp(0, 1)
        out.append(adv.detach())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> tuple[float, float]:
    """Wall and process-CPU seconds per call (after one warm-up call). CPU seconds stay meaningful on a
    shared machine, where wall time also measures the neighbours."""
    fn()
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats


def entry(n: int, wall_cpu: tuple[float, float], **extra: float) -> dict:
    wall, cpu = wall_cpu
    return {"n": n, "seconds": wall, "cpu_seconds": cpu, "images_per_s": n / wall, "images_per_cpu_s": n / cpu,
            **extra}


class _Flops(TorchDispatchMode):
    """Counts matmul/conv FLOPs with torch's own formulas (``torch.utils.flop_counter.flop_registry``).
    (``FlopCounterMode`` itself tracks modules with autograd hooks that refuse ``autograd.grad`` on leaves,
    which the SGLD chain uses.)"""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs of one PGD step (forward + input gradient) per image."""
    xr = x.clone().requires_grad_(True)
    with _Flops() as counter:
        loss = F.cross_entropy(model(xr), y)
        torch.autograd.grad(loss, xr)
    return counter.total / x.shape[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_ckpt = ROOT / "runs/quick-jem/final.pt"
    ap.add_argument("--checkpoint", default=str(default_ckpt) if default_ckpt.is_file() else None,
                    help="weights to use [runs/quick-jem/final.pt if present, else a fresh quick-size model]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sgld-steps", type=int, default=10)
    ap.add_argument("--n-chains", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="PGD steps")
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--n-batched", type=int, default=16, help="images for the batched through-chain PGD")
    ap.add_argument("--n-loop", type=int, default=8, help="images for the one-at-a-time loop")
    ap.add_argument("--n-bare", type=int, default=128, help="images for bare-network PGD")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--quick", action="store_true", help="seconds: 1 step, 1 chain step, a few images, no compile")
    args = ap.parse_args(argv)
    if args.quick:
        args.sgld_steps, args.n_chains, args.steps, args.n_batched, args.n_loop, args.n_bare = 1, 1, 1, 2, 1, 4

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.checkpoint:
        model = load(args.checkpoint, device)
    else:
        torch.manual_seed(0)
        model = EnergyModel(ModelConfig()).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ds = load_dataset("fashion-mnist", "test")
    n_max = max(args.n_batched, args.n_loop, args.n_bare)
    x_all, y_all = ds.batch(slice(0, n_max))
    x_all, y_all = x_all.to(device), y_all.to(device)
    eps, steps, k, c = args.eps, args.steps, args.sgld_steps, args.n_chains
    alpha = 2.5 * eps / steps
    chain = dict(init_noise=0.03, step_size=1.0, noise=0.01)
    results: dict[str, dict] = {}

    # bare network, torchattacks PGD
    xb, yb = x_all[:args.n_bare], y_all[:args.n_bare]
    bare_atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    results["bare"] = entry(len(xb), timed(lambda: bare_atk(xb, yb), device),
                            flops_per_step_per_image=step_flops(model, xb[:1], yb[:1]))

    # batched through-chain PGD (attacks.white.PGD -> torchattacks PGD on the RefinedClassifier)
    xc, yc = x_all[:args.n_batched], y_all[:args.n_batched]
    for mode in ("bpda", "full"):
        rc = RefinedClassifier(model, k, n_chains=c, grad_mode=mode, **chain)
        atk = PGD(rc, norm="linf", eps=eps, steps=steps, step_size=alpha, eval_draws=1)
        results[f"batched_{mode}"] = entry(len(xc), timed(lambda: list(atk.candidates(xc, yc)), device),
                                           flops_per_step_per_image=step_flops(rc, xc[:1], yc[:1]))

    # the same batched PGD with the refined classifier's speed options: bf16 autocast, torch.compile (bpda only:
    # the full-gradient chain needs double backward, which compiled graphs lack)
    options = (("bpda", "bf16"), ("full", "bf16")) + ((("bpda", "compile"),) if not args.quick else ())
    for mode, option in options:
        rc = RefinedClassifier(model, k, n_chains=c, grad_mode=mode, **chain, **{option: True})
        atk = PGD(rc, norm="linf", eps=eps, steps=steps, step_size=alpha, eval_draws=1)
        results[f"batched_{mode}_{option}"] = entry(len(xc), timed(lambda: list(atk.candidates(xc, yc)), device))

    # one image at a time, reference style (BPDA-like gradient through `.data +=`)
    xl, yl = x_all[:args.n_loop], y_all[:args.n_loop]
    results["loop_reference"] = entry(len(xl), timed(
        lambda: reference_loop(model, xl, yl, eps=eps, alpha=alpha, steps=steps, n_steps=k, n_dup=c,
                               sigma=chain["init_noise"], sgld_sigma=chain["noise"]), device))

    ips = {name: r["images_per_s"] for name, r in results.items()}
    ipc = {name: r["images_per_cpu_s"] for name, r in results.items()}
    ratios = {
        "batched_bpda_over_loop": ips["batched_bpda"] / ips["loop_reference"],
        "bare_over_batched_bpda": ips["bare"] / ips["batched_bpda"],
        "bare_over_batched_full": ips["bare"] / ips["batched_full"],
        "cpu_batched_bpda_over_loop": ipc["batched_bpda"] / ipc["loop_reference"],
        "cpu_bare_over_batched_bpda": ipc["bare"] / ipc["batched_bpda"],
        "cpu_bare_over_batched_full": ipc["bare"] / ipc["batched_full"],
        "batched_bpda_bf16_over_fp32": ips["batched_bpda_bf16"] / ips["batched_bpda"],
        "batched_full_bf16_over_fp32": ips["batched_full_bf16"] / ips["batched_full"],
        **({"batched_bpda_compile_over_eager": ips["batched_bpda_compile"] / ips["batched_bpda"]}
           if "batched_bpda_compile" in ips else {}),
        "flops_batched_bpda_over_bare": results["batched_bpda"]["flops_per_step_per_image"]
        / results["bare"]["flops_per_step_per_image"],
        "flops_batched_full_over_bare": results["batched_full"]["flops_per_step_per_image"]
        / results["bare"]["flops_per_step_per_image"],
    }
    dev = device_name(device)
    record = {
        "device": dev, "torch_version": str(torch.__version__), "threads": torch.get_num_threads(),
        "git_sha": git_sha(), "timestamp": now(),
        "checkpoint": args.checkpoint, "checkpoint_sha256": file_sha256(args.checkpoint) if args.checkpoint else None,
        "settings": {"norm": "linf", "eps": eps, "pgd_steps": steps, "step_size": alpha, "sgld_steps": k,
                     "n_chains": c, **chain, "timed": "adversarial generation only, after one warm-up call"},
        "results": results, "ratios": ratios,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")[:60]
    (out / f"attack_throughput-{slug}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Attack throughput on {dev}", "",
             f"L∞ PGD ε={eps:.4g}, {steps} steps, α={alpha:.4g}; JEM-{k} with {c} chains; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; git {record['git_sha'][:12]}; {record['timestamp']}.", "",
             "| method | images | wall s | images/s | CPU s | images/CPU-s | GFLOP per PGD step per image |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        fl = r.get("flops_per_step_per_image")
        lines.append(f"| {name} | {r['n']} | {r['seconds']:.2f} | {r['images_per_s']:.3f} | {r['cpu_seconds']:.2f} | "
                     f"{r['images_per_cpu_s']:.3f} | {'' if fl is None else f'{fl / 1e9:.3f}'} |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k_} | {v:.2f} |" for k_, v in ratios.items()]
    (out / f"attack_throughput-{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
