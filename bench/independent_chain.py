"""An independent measure of the SGLD refinement: does the chain move images as far, and change as many
predictions, as ``robust_jem.activity`` (the figures the reports print beside every JEM-k verdict) says?

The chain is written here from the paper's description, not from the project's code: each test image is copied
``--chains`` times in [-1, 1] space (2x - 1), Gaussian noise of std ``--init-noise`` is added, then ``--k`` steps of
x <- x + step · ∇x logsumexp f(x) + noise · N(0, 1); the prediction is the argmax of the chains' mean logits. The
Fashion-MNIST IDX files are parsed by ``independent_health.py``'s reader, the random numbers come from this script's
own generator. Only the classifier under test comes from the project (``robust_jem.load``: [0,1] images -> logits).

Both measures run on the same ``--n`` test images with different random draws, so they agree up to the chains' noise;
the bar (issue 27) is agreement within ``--tolerance`` relative on the displacement (L2, L∞) and on the fraction of
predictions changed against the bare classifier and against JEM-0 (the same chains without steps).

    python bench/independent_chain.py runs/sweep-paper-small/paper-clamp/final.pt --k 10 --tag=-paper-clamp
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from independent_health import fashion  # noqa: E402  (this folder's own IDX reader)
from infra.provenance import device_name, file_sha256, git_sha, now  # noqa: E402
from robust_jem import load  # noqa: E402  (the classifier under test)

COMPARED = ("displacement_l2", "displacement_linf", "changed_vs_bare", "changed_vs_jem0")


def measure(f: torch.nn.Module, x: torch.Tensor, *, k: int, chains: int, init_noise: float, step: float, noise: float,
            seed: int, batch: int = 250) -> dict[str, float]:
    """The chain's mean displacement ([0,1] pixel units), energies and prediction changes on images ``x``."""
    g = torch.Generator().manual_seed(seed)
    tot = {name: 0.0 for name in ("displacement_l2", "displacement_linf", "energy_start", "energy_end",
                                  "changed_vs_bare", "changed_vs_jem0")}

    def logits(z: torch.Tensor) -> torch.Tensor:  # f takes [0,1] images; the chain lives in [-1,1]
        return f((z + 1) / 2)

    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        n = len(xb)
        z = (2 * xb - 1).repeat(chains, 1, 1, 1)
        start = z + init_noise * torch.randn(z.shape, generator=g)
        cur = start.clone()
        for _ in range(k):
            cur.requires_grad_(True)
            (grad,) = torch.autograd.grad(torch.logsumexp(logits(cur), 1).sum(), cur)
            cur = (cur + step * grad + noise * torch.randn(cur.shape, generator=g)).detach()
        with torch.no_grad():
            d = ((cur - start) / 2).flatten(1)
            tot["displacement_l2"] += float(d.norm(dim=1).view(chains, n).mean(0).sum())
            tot["displacement_linf"] += float(d.abs().amax(1).view(chains, n).mean(0).sum())
            l_start, l_end = logits(start), logits(cur)
            tot["energy_start"] += float(-torch.logsumexp(l_start, 1).view(chains, n).mean(0).sum())
            tot["energy_end"] += float(-torch.logsumexp(l_end, 1).view(chains, n).mean(0).sum())
            refined = l_end.view(chains, n, -1).mean(0).argmax(1)
            tot["changed_vs_bare"] += float((refined != f(xb).argmax(1)).sum())
            tot["changed_vs_jem0"] += float((refined != l_start.view(chains, n, -1).mean(0).argmax(1)).sum())
    return {name: v / len(x) for name, v in tot.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--n", type=int, default=5000, help="the first N test images")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chains", type=int, default=5)
    ap.add_argument("--init-noise", type=float, default=0.03)
    ap.add_argument("--step", type=float, default=1.0, help="SGLD step (the paper's: 1)")
    ap.add_argument("--noise", type=float, default=0.01, help="SGLD noise (the paper's: 0.01)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    x, y = fashion(args.data, "test")
    x, y = x[:args.n], y[:args.n]
    f = load(args.checkpoint).requires_grad_(False).eval()
    t0 = time.perf_counter()
    mine = measure(f, x, k=args.k, chains=args.chains, init_noise=args.init_noise, step=args.step,
                   noise=args.noise, seed=args.seed)
    t_mine = time.perf_counter() - t0

    from robust_jem.activity import refinement_activity  # the project's measure, on the same images
    from robust_jem.refined import Refinement

    t0 = time.perf_counter()
    theirs = refinement_activity(f, Refinement(args.k, args.chains, args.init_noise, args.step, args.noise), x, y,
                                 seed=0).fields()
    t_theirs = time.perf_counter() - t0
    compared = {}
    for name in (*COMPARED, "energy_start", "energy_end"):
        a, b = mine[name], float(theirs[name])
        rel = abs(a - b) / max(abs(a), 1e-12)
        compared[name] = {"independent": a, "project": b, "relative_difference": rel,
                          **({"within_tolerance": rel <= args.tolerance} if name in COMPARED else {})}
    ok = all(c["within_tolerance"] for n, c in compared.items() if n in COMPARED)
    result = {"checkpoint": str(args.checkpoint), "sha256": file_sha256(args.checkpoint), "n": len(x),
              "chain": {"k": args.k, "chains": args.chains, "init_noise": args.init_noise, "step": args.step,
                        "noise": args.noise}, "tolerance": args.tolerance, "compared": compared, "agrees": ok,
              "wall_s": {"independent": round(t_mine, 1), "project": round(t_theirs, 1)},
              "git": git_sha(), "when": now(), "device": device_name("cpu")}
    stem = f"independent_chain{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Independent chain measure{args.tag.replace('-', ' ')}", "",
          f"Checkpoint `{args.checkpoint}` (sha256 `{result['sha256'][:16]}`), the first {len(x)} Fashion-MNIST test "
          f"images, JEM-{args.k}: {args.chains} chains, init noise {args.init_noise:g}, SGLD step {args.step:g}, "
          f"noise {args.noise:g} ([-1, 1] space). Displacements in [0, 1] pixel units. Bar: the four compared "
          f"figures within {100 * args.tolerance:g} % relative. Generated by `bench/independent_chain.py` at git "
          f"{result['git']}, {result['when']}, {result['device']}; {result['wall_s']['independent']} s "
          f"(independent) and {result['wall_s']['project']} s (project).", "",
          "| figure | independent (this script) | project (`robust_jem.activity`) | relative difference | within |",
          "|---|---|---|---|---|"]
    for name, c in compared.items():
        within = ("yes" if c["within_tolerance"] else "**no**") if "within_tolerance" in c else "(not a bar)"
        md.append(f"| {name} | {c['independent']:.4g} | {c['project']:.4g} | {100 * c['relative_difference']:.1f} % "
                  f"| {within} |")
    md += ["", f"**{'Agrees' if ok else 'Does not agree'}** within {100 * args.tolerance:g} %.", ""]
    (args.out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
