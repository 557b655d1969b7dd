"""`rnnkit gradflow`: measure ||dL/dh_t|| over t per cell, its memory horizon, at init and after training."""
from __future__ import annotations

from ..tasks import BACKENDS, gradflow, memory
from .common import finite_float, output_folder, parse_cells, seed_int

EPILOG = """examples:
  rnnkit gradflow --cell rnn,lstm,gru --length 100                      # at initialisation
  rnnkit gradflow --cell rnn,lstm,gru --length 100 --trained-steps 1000 # and after training on adding
  rnnkit gradflow --cell gru,mingru,minlstm --length 200                # the minimal cells (no U) beside the GRU
The loss is on the last step only (adding problem, MSE); the memory horizon is the number of steps
back at which the batch-mean ||dL/dh_t|| first falls below --threshold x its last-step value
(= T and flagged "censored" when it never does). Writes OUT/gradflow.json, OUT/gradflow.png
(gradient norm against steps back, log scale), and gradflow_{jacobian,saturation,hidden_*,heatmap_*}.png.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("gradflow", help="measure how the gradient vanishes or explodes back through time",
                              description=__doc__, epilog=EPILOG)
    p.add_argument("--cell", default="rnn,lstm,gru", help="cells, comma-separated among rnn,lstm,gru,mingru,minlstm (default rnn,lstm,gru)")
    p.add_argument("--length", type=int, default=100, help="sequence length T (default 100)")
    p.add_argument("--hidden-size", type=int, default=128, help="hidden units H (default 128)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences in the measuring batch (default 64)")
    p.add_argument("--trained-steps", type=int, default=0,
                   help="also train this many Adam steps on the adding problem and measure again (default 0)")
    p.add_argument("--lr", type=finite_float, default=1e-3, help="learning rate for --trained-steps (default 1e-3)")
    p.add_argument("--clip-norm", type=finite_float, default=None, help="clip the gradient norm while training (default off)")
    p.add_argument("--seed", type=seed_int, default=0, help="first seed (default 0)")
    p.add_argument("--num-seeds", type=int, default=3, help="seeds to average the horizon over (default 3)")
    p.add_argument("--checkpoints", type=int, default=8,
                   help="profiles recorded during training, at steps evenly spaced from 0 to the last (both "
                        "included; at most --trained-steps + 1) (default 8)")
    p.add_argument("--threshold", type=finite_float, default=1e-3, help="horizon threshold (default 1e-3)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="what the --trained-steps training runs: auto (torch's fused kernel) or engine (rnnkit's; "
                        "faster on CPU); the traced measurements always run the engine; the min cells always run their own "
                        "scan (default auto)")
    p.add_argument("--out", default="runs/gradflow", help="output folder (default runs/gradflow)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    cfg = gradflow.GradflowConfig(cells=parse_cells(args.cell, memory.CELLS), length=args.length, hidden_size=args.hidden_size,
                                  batch_size=args.batch_size, trained_steps=args.trained_steps, lr=args.lr,
                                  clip_norm=args.clip_norm,
                                  seed=args.seed, num_seeds=args.num_seeds, checkpoints=args.checkpoints,
                                  threshold=args.threshold)
    out = output_folder(args.out)
    summary = gradflow.run(cfg, out, progress=not args.no_progress)
    print(f"{'cell':<7} {'when':<8} {'horizon (mean)':>14}  per seed          {'median growth/step':>18}  exploding  test MSE")
    gone = []                                                # (cell, when, seeds) whose gradient is 0 one step back
    for cell, s in summary["cells"].items():
        for when in ("init", "trained"):
            if when not in s:
                continue
            d = s[when]
            per = ",".join(f"{h['steps']}{'+' if h['censored'] else ''}" for h in d["horizon_per_seed"])
            geo = sum(e["median"] for e in d["explosion_per_seed"]) / len(d["explosion_per_seed"])
            expl = any(e["exploding"] for e in d["explosion_per_seed"])
            mse = f"{s['training']['test_mse_mean']:.4f}" if when == "trained" else ""
            print(f"{cell:<7} {when:<8} {d['horizon_mean']:>14.1f}  {per:<17} {geo:>18.3f}  {str(expl):<9}  {mse}")
            seeds = [str(cfg.seed + i) for i, e in enumerate(d["explosion_per_seed"]) if e["vanished_at"] == 1]
            if seeds:
                gone.append(f"{cell} {when}: the gradient is exactly 0 one step back on seed {','.join(seeds)} "
                            "(saturated units or underflow): growth factor 0, vanished_at 1")
    done = (f"('+' = never fell below the threshold: horizon = T, censored). wrote {out / 'gradflow.json'}, "
            f"{', '.join(summary['figures'])}")
    print("\n".join([*gone, done]))
    return 0
