"""An independent check of a study's headline: a simple attack written here, not in ``attacks/``.

For every defense in a study run at the given L∞ or L2 budgets, it attacks the headline's own examples with a
margin-loss PGD (loss = best other logit − true logit, averaged over ``--eot`` fresh chain draws per step;
step size cosine-annealed from ε/4 to ε/100 over ``--steps`` steps; start at a uniform point in the ball;
the best iterate per example kept), then judges the end point in ``--draws`` fresh draws with its own
seeds (robust = correct in all of them). It shares no code with the suite's attacks, loss or step rule:
only the defense (checkpoint + refinement, via ``robust_jem``) and the headline file.

The suite's robust accuracy should not exceed this attack's by more than a couple of examples per 100:
the count of examples robust in the headline but broken here is the number to watch.

``--clamp-grad straight-through`` aims at a chain that clamps its states to [-1, 1] (``JEM-k[clamp]``): the
gradient then comes from a chain written here whose clamp passes gradients through unchanged (forward: the same
chain; backward: the clamp as the identity), because the exact clamp has a zero Jacobian on every clamped pixel, a
place for gradients to vanish. The verdict is still the real defense's. ``--purifier EBM.pt`` supplies the energy
model of purified rows (checked against the sha256 the rows carry); without it they are skipped.

    python bench/independent_attack.py results/reference-quick-fashion-mnist --eps 0.05,0.1
    python bench/independent_attack.py results/reference-quick-fashion-mnist --norm l2 --eps 1,2 --tag -l2
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.provenance import device_name, device_slug, file_sha256, git_sha, now  # noqa: E402
from infra.records import read_rows  # noqa: E402
from robust_jem import load, load_dataset  # noqa: E402
from robust_jem.refined import RefinedClassifier, Refinement  # noqa: E402


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - true  # > 0: misclassified


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, eot: int,
           g: torch.Generator, norm: str = "linf") -> torch.Tensor:
    """Margin-loss PGD (L∞: signed steps, clipping; L2: normalised steps, radial projection), cosine step schedule,
    EOT-averaged gradients, best iterate per example."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
    else:  # a uniform direction at a uniform radius in the ball
        d = torch.randn(x.shape, generator=g)
        delta = d / _flat_norm(d) * eps * torch.rand(x.shape[0], generator=g).view(-1, *([1] * (x.dim() - 1)))
    delta = (x + delta).clamp(0, 1) - x
    best, best_loss = x.clone(), torch.full((x.shape[0],), -math.inf)
    for t in range(steps):
        alpha = eps / 100 + (eps / 4 - eps / 100) * 0.5 * (1 + math.cos(math.pi * t / steps))
        xa = (x + delta).clamp(0, 1).requires_grad_(True)
        grad = torch.zeros_like(x)
        loss_mean = torch.zeros(x.shape[0])
        for _ in range(eot):
            loss = margin_loss(model(xa), y)
            grad += torch.autograd.grad(loss.sum(), xa)[0]
            loss_mean += loss.detach() / eot
        better = loss_mean > best_loss
        best[better], best_loss[better] = xa.detach()[better], loss_mean[better]
        if norm == "linf":
            delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
        else:
            delta = delta + alpha * grad / _flat_norm(grad)
            delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
        delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad():  # the last point too
        xa = (x + delta).clamp(0, 1)
        last = margin_loss(model(xa), y)
        better = last > best_loss
        best[better] = xa[better]
    return best


class StraightThroughClampChain(torch.nn.Module):
    """The clamped refinement ([0,1] images -> logits averaged over chains), its chain written here: Gaussian start
    noise, SGLD steps on the energy with the graph kept, and a clamp to [-1, 1] whose backward is the identity."""

    def __init__(self, defense: RefinedClassifier, seed: int = 4242) -> None:
        super().__init__()
        self.d, self.g = defense, torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, n = self.d, x.shape[0]
        with torch.enable_grad():  # the chain needs the energy's gradient even when the caller wants none
            z = (x * 2 - 1).repeat(d.n_chains, 1, 1, 1)
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            z = z + d.init_noise * torch.randn(z.shape, generator=self.g)
            for _ in range(d.sgld_steps):
                (grad,) = torch.autograd.grad(d.energy_z(z).sum(), z, create_graph=True)
                z = z - d.step_size * grad + d.noise * torch.randn(z.shape, generator=self.g)
                z = z + (z.clamp(-1, 1) - z).detach()
            logits = d.logits_z(z).view(d.n_chains, n, -1).mean(0)
        return logits if torch.is_grad_enabled() else logits.detach()


@torch.no_grad()
def robust_in_all_draws(model: RefinedClassifier, x: torch.Tensor, y: torch.Tensor, draws: int,
                        seed: int) -> torch.Tensor:
    ok = torch.ones(x.shape[0], dtype=torch.bool)
    for m in range(draws if not model.deterministic else 1):
        g = torch.Generator().manual_seed(seed + 7919 * m)
        ok &= model(x, generator=g).argmax(1) == y
    return ok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="study run folder (rows.jsonl, headline.json)")
    ap.add_argument("--norm", choices=("linf", "l2"), default="linf")
    ap.add_argument("--eps", default=None, help="budgets of --norm [linf: 0.05,0.1; l2: 1,2]")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eot", type=int, default=4, help="gradient draws per step on randomized models")
    ap.add_argument("--draws", type=int, default=20, help="fresh draws of the final verdict")
    ap.add_argument("--models", default=None, help="comma-separated model labels (default: every headline model)")
    ap.add_argument("--clamp-grad", choices=("exact", "straight-through"), default="exact",
                    help="gradient of a clamped chain's clamp (see the module docstring)")
    ap.add_argument("--purifier", type=Path, default=None, help="the energy model of purified rows")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    eps_list = [float(e) for e in (args.eps or {"linf": "0.05,0.1", "l2": "1,2"}[args.norm]).split(",")]
    head = json.loads((args.run / "headline.json").read_text())
    rows = read_rows(args.run)
    defenses = {}
    for r in rows:
        if r.get("kind") == "whitebox" and r.get("defense_id") and r.get("checkpoint"):
            defenses.setdefault(r["defense_id"], r)
    # labels hold commas themselves (CE+EBM-100[clamp, ebm=...]): split only on commas outside brackets
    wanted = set(re.split(r",\s*(?![^\[]*\])", args.models)) if args.models else set()
    t0 = time.perf_counter()
    results = []
    for cell in head:
        if cell["norm"] != args.norm or not any(math.isclose(cell["eps"], e) for e in eps_list):
            continue
        r = defenses.get(cell["subject"])
        if r is None or (wanted and cell["model"] not in wanted):
            continue
        params = r.get("defense_params") or {}
        if args.clamp_grad == "straight-through" and not params.get("sgld_clamp"):
            print(f"skipping {cell['model']}: --clamp-grad straight-through on a chain that does not clamp", flush=True)
            continue
        purifier = None
        if params.get("purifier"):
            if args.purifier is None or file_sha256(args.purifier)[:16] != params["purifier"]:
                print(f"skipping {cell['model']}: a purified defense and --purifier is not its energy model "
                      f"(sha256 {params['purifier']})", flush=True)
                continue
            purifier = load(args.purifier).requires_grad_(False)
        net = load(r["checkpoint"]).requires_grad_(False)
        ref = Refinement(r["sgld_steps"], r["n_chains"], r["init_noise"], r["sgld_step_size"], r["sgld_noise"],
                         purifier=params.get("purifier", ""),
                         clamp=bool(params.get("sgld_clamp")))  # the defense the row names, clamp included
        model = RefinedClassifier.from_refinement(net, ref, purifier=purifier, grad_mode="full", seed=12345)
        surrogate = StraightThroughClampChain(model) if args.clamp_grad == "straight-through" else model
        ds = load_dataset(r["dataset"], "test")
        idx = torch.tensor(cell["example_indices"])
        x, y = ds.batch(idx)
        g = torch.Generator().manual_seed(2024)
        t = time.perf_counter()
        x_adv = attack(surrogate, x, y, cell["eps"], args.steps, 1 if model.deterministic else args.eot, g, args.norm)
        mine = robust_in_all_draws(model, x_adv, y, args.draws, seed=99)
        suite = torch.tensor(cell["correct"], dtype=torch.bool)
        results.append({"model": cell["model"], "defense_id": cell["subject"], "norm": args.norm, "eps": cell["eps"],
                        "n": len(idx),
                        "suite_robust": int(suite.sum()), "independent_robust": int(mine.sum()),
                        "suite_robust_but_broken_here": int((suite & ~mine).sum()),
                        "broken_by_suite_robust_here": int((~suite & mine).sum()), "wall_s": time.perf_counter() - t})
        print(json.dumps(results[-1]), flush=True)
    if not results:  # a comparison of nothing would report "within the bar"
        known = sorted({c["model"] for c in head if c["norm"] == args.norm})
        print(f"error: no {args.norm} cell of {args.run} at ε {args.eps or eps_list} was attacked"
              + (f" (--models {args.models!r})" if args.models else "") + f"; its {args.norm} models: "
              + "; ".join(known) + "; nothing written", file=sys.stderr)
        sys.exit(2)
    dev = device_name("cpu")
    slug = device_slug(dev)
    meta = {"run": str(args.run), "timestamp": now(), "git_sha": git_sha(), "device": dev, "norm": args.norm,
            "eps": eps_list,
            "steps": args.steps, "eot": args.eot, "draws": args.draws, "wall_s": time.perf_counter() - t0,
            "clamp_grad": args.clamp_grad, "purifier": str(args.purifier) if args.purifier else None,
            "attack": f"margin-loss {'L∞' if args.norm == 'linf' else 'L2'} PGD, cosine step ε/4→ε/100, uniform start, "
                      "best iterate, EOT-averaged gradient"
                      + ("" if args.clamp_grad == "exact" else ", the clamp's backward the identity"),
            "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"independent_attack-{slug}{args.tag}.json").write_text(json.dumps(meta, indent=1))
    lines = [f"# Independent attack vs the headline of `{args.run}`", "",
             f"{meta['timestamp']}, git {meta['git_sha']}, {dev}. {meta['attack']}; {args.steps} steps, EOT "
             f"{args.eot} (1 on deterministic models), verdict: correct in all {args.draws} fresh draws (own seeds). "
             f"Wall time {meta['wall_s']:.0f} s.", "",
             f"| model | {'L∞' if args.norm == 'linf' else 'L2'} ε | n | robust (suite headline) | robust (independent) | robust in suite, broken here | "
             "per 100 |", "|---|---|---|---|---|---|---|"]
    for res in results:
        lines.append(f"| {res['model']} | {res['eps']:g} | {res['n']} | {res['suite_robust']} | "
                     f"{res['independent_robust']} | {res['suite_robust_but_broken_here']} | "
                     f"{100 * res['suite_robust_but_broken_here'] / res['n']:.1f} |")
    worst = max((100 * r["suite_robust_but_broken_here"] / r["n"] for r in results), default=0.0)
    lines += ["", f"Largest excess of the suite over this attack: {worst:.1f} examples per 100 "
                  f"({'within' if worst <= 2 else 'ABOVE'} the bar of 2)."]
    (args.out / f"independent_attack-{slug}{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
