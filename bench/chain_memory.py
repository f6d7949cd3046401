"""Peak memory and time of a full-gradient attack step through a k-step SGLD chain, plain against checkpointed.

One attacker gradient (forward through JEM-k with ``grad_mode="full"``, backward to the input) on the quick
checkpoint's network (or a randomly initialised small net with ``--random``), for k in ``--steps``, both ways
(:func:`robust_jem.sgld.sgld` unrolled with ``create_graph`` vs :func:`robust_jem.sgld.sgld_checkpointed`). Each
measurement runs in a fresh process: on CUDA the peak is ``torch.cuda.max_memory_allocated`` over the step, on a
CPU the growth of the process's peak resident set (``ru_maxrss``) over the step, both in MiB. The gradients of the
two ways are compared too (max relative difference). A way that runs out of memory or past ``--timeout`` is
reported as such.

    python bench/chain_memory.py --checkpoint runs/quick-fashion-mnist/jem/final.pt --steps 10,100,1000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.provenance import device_name, device_slug, git_sha, now  # noqa: E402


def one(checkpoint: str | None, steps: int, way: str, device: str, batch: int, chains: int, out: str) -> None:
    """The measurement itself (in a child process): one attacker gradient; writes peak MiB, seconds, gradient."""
    from robust_jem import EnergyModel, RefinedClassifier, load
    from robust_jem.config import ModelConfig

    dev = torch.device(device)
    torch.manual_seed(0)
    model = (load(checkpoint, dev) if checkpoint else EnergyModel(ModelConfig()).to(dev)).requires_grad_(False)
    rc = RefinedClassifier(model, steps, n_chains=chains, grad_mode="full", seed=0,
                           checkpoint="always" if way == "checkpointed" else "never")
    c, s = model.cfg.in_channels, model.cfg.image_size
    x = torch.rand(batch, c, s, s, generator=torch.Generator().manual_seed(1)).to(dev).requires_grad_(True)
    warm = RefinedClassifier(model, 2, n_chains=chains, grad_mode="full", seed=0,  # one-off allocations first
                             checkpoint=rc.checkpoint)
    torch.autograd.grad(warm(x)[:, 0].sum(), x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t = time.perf_counter()
    (grad,) = torch.autograd.grad(rc(x)[:, 0].sum(), x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    wall = time.perf_counter() - t
    torch.save({"peak_mib": peak, "wall_s": wall, "grad": grad.detach().cpu()}, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a JEM checkpoint (default: a random small net)")
    ap.add_argument("--steps", default="10,100,1000")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2, help="images per attacker gradient")
    ap.add_argument("--chains", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--child", nargs=4, metavar=("STEPS", "WAY", "OUT", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        steps, way, out, ckpt = args.child
        one(None if ckpt == "-" else ckpt, int(steps), way, args.device, args.batch, args.chains, out)
        return
    results = []
    tmp = args.out / ".chain_memory.pt"
    args.out.mkdir(parents=True, exist_ok=True)
    for k in [int(s) for s in args.steps.split(",")]:
        grads = {}
        for way in ("plain", "checkpointed"):
            cmd = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch), "--chains",
                   str(args.chains), "--child", str(k), way, str(tmp), args.checkpoint or "-"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                ok = proc.returncode == 0
                status = "ok" if ok else f"failed (exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]})"
            except subprocess.TimeoutExpired:
                ok, status = False, f"over {args.timeout:.0f} s"
            rec = {"steps": k, "way": way, "status": status}
            if ok:
                m = torch.load(tmp)
                rec.update(peak_mib=round(m["peak_mib"], 1), wall_s=round(m["wall_s"], 2))
                grads[way] = m["grad"]
            results.append(rec)
            print(json.dumps(rec), flush=True)
        if len(grads) == 2:
            diff = float((grads["plain"] - grads["checkpointed"]).abs().max() / grads["plain"].abs().max())
            results[-1]["max_rel_grad_diff"] = results[-2]["max_rel_grad_diff"] = diff
    tmp.unlink(missing_ok=True)
    dev = device_name(args.device)
    slug = device_slug(dev)
    meta = {"timestamp": now(), "git_sha": git_sha(), "device": dev, "checkpoint": args.checkpoint,
            "batch": args.batch, "chains": args.chains, "results": results}
    stem = args.out / f"chain_memory-{slug}{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    unit = "growth of peak RSS" if args.device == "cpu" else "peak allocated"
    lines = [f"# Full-gradient chain: plain vs checkpointed ({dev})", "",
             f"{meta['timestamp']}, git {meta['git_sha']}. One attacker gradient through JEM-k ({args.chains} chains, "
             f"{args.batch} images, {'`' + args.checkpoint + '`' if args.checkpoint else 'a random small net'}); "
             f"memory = {unit} over the step, each in a fresh process.", "",
             "| k | way | status | peak MiB | seconds | max rel. gradient difference |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['steps']} | {r['way']} | {r['status']} | {r.get('peak_mib', '')} | {r.get('wall_s', '')} | "
                     f"{'%.1e' % r['max_rel_grad_diff'] if 'max_rel_grad_diff' in r else ''} |")
    by = {(r["steps"], r["way"]): r for r in results}
    for k in sorted({r["steps"] for r in results}):
        p, c = by.get((k, "plain"), {}), by.get((k, "checkpointed"), {})
        if "peak_mib" in p and "peak_mib" in c and c["peak_mib"] > 0:
            lines.append(f"\nk = {k}: checkpointed peak = {c['peak_mib'] / p['peak_mib']:.3f} x plain, "
                         f"time {c['wall_s'] / p['wall_s']:.2f} x plain.")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
