"""What SFERD's semantic gradient predictor adds: held-out L1 to the teacher's samples of the draft generator
alone, of the exported student (latent from the tiny latent model) and of the student given the encoder's latent
of the true target (an upper bound the latent model tries to reach).

    python -m benchmarks.sferd_parts --model runs/sferd/model-best.safetensors \
        --cache runs/pairs-fmnist-euler8-ag1.3 --holdout 200 --out benchmarks/results/sferd_parts
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    import torch

    from onestep.checkpoint import load_model
    from benchmarks.report import write_report
    from onestep.provenance import git_revision, machine_info
    from training.pair_cache import load_pair_cache

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a sferd-generator checkpoint")
    ap.add_argument("--cache", required=True, help="the pair cache the run trained on")
    ap.add_argument("--holdout", type=int, default=200, help="the run's held-out pairs (the last ones)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    model, meta = load_model(args.model)
    if meta["model"]["kind"] != "sferd-generator":
        raise SystemExit(f"{args.model} is a {meta['model']['kind']}, not a SFERD student")
    _, hold = load_pair_cache(args.cache, args.holdout)
    z = torch.from_numpy(hold["z"].astype(np.float32))
    x0 = torch.from_numpy(hold["x0"].astype(np.float32))
    labels = torch.from_numpy(hold["labels"]) if "labels" in hold else None
    with torch.no_grad():
        draft = model.generator(z, labels)
        outs = {"draft generator alone": draft, "exported student (latent model)": model(z, labels),
                "with the encoder's latent of the target (bound)": model.refine(z, draft, model.encoder(x0), labels)}
        rows = [{"variant": k, "heldout_l1": float((v.clamp(-1, 1) - x0).abs().mean())} for k, v in outs.items()]
    res = {"model": args.model, "cache": args.cache, "n": len(z), "rows": rows,
           "command": "python -m benchmarks.sferd_parts " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(), "git_revision": git_revision()}
    lines = ["# SFERD: what the semantic gradient predictor adds", "",
             f"Held-out L1 to the teacher's (attention-guided) samples, {len(z)} pairs never trained on.", "",
             "| variant | held-out L1 |", "|---|---|"]
    lines += [f"| {r['variant']} | {r['heldout_l1']:.5f} |" for r in rows]
    write_report(args.out, res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
