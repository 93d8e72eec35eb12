"""The error bf16 autocast brings to SEPO's log-probabilities: the measurement behind amp="bf16"
(docs/design.md).

    python docs/bf16_error.py --out runs/dna     # the CPU default's trained models (after train_dna.py)
    python docs/bf16_error.py --preset paper      # the paper's denoiser, untrained unless --out holds one

Takes train_dna.py's flags and --warmup N (default 5). The denoiser and the fine-tuning oracle are loaded from
--out when that run has cached them (pretrain.pt, ft_oracle.pt), else they are untrained. N SEPO iterations
(no corrector) get past Adam's atypically large first steps; then one more Adam step gives theta_new and
theta_old, the two weights whose ratio SEPO clips. M forward paths per sample are scored under fp32 and under
bf16 autocast, with the same weights and the same paths. Printed: the mean |error| of a path log-probability
and of a SNIS log-ratio, next to the mean |log r| itself. bf16 suits the ratios only if the error is far below
|log r|.
"""
import argparse
import copy
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sepo  # noqa: E402
import train_dna as T  # noqa: E402
from data.dna import SEQ_LEN, hepg2_score  # noqa: E402
from models.dna import DilatedCNNDenoiser, EnformerOracle, predict  # noqa: E402
from models.safe_load import load_checkpoint  # noqa: E402


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--warmup", type=int, default=5)
    opts, rest = p.parse_known_args(argv)
    cfg = T.parse_args(rest)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.stream_seed)  # as train_dna.bench
    model = DilatedCNNDenoiser(cfg.hidden, cfg.stacks)
    oracle = EnformerOracle(4, cfg.oracle_dim, cfg.oracle_depth, cfg.oracle_heads, cfg.oracle_downsamples)
    for m, name in ((model, "pretrain.pt"), (oracle, "ft_oracle.pt")):
        path = os.path.join(cfg.out, name)
        print(f"{name}: {'loaded from ' + path if os.path.exists(path) else 'untrained'}")
        if os.path.exists(path):
            m.load_state_dict(load_checkpoint(path)["model"])
    model = model.to(device)
    oracle = oracle.to(device).eval()
    graph, noise = sepo.Masked(4), sepo.LogLinear()
    reward_fn = lambda x: hepg2_score(predict(oracle, x), "encode")
    trainer = sepo.SEPO(model, graph, noise, reward_fn, SEQ_LEN, T.sepo_config(cfg, 0))
    for _ in range(opts.warmup):
        trainer.step()
    old = copy.deepcopy(trainer.model)
    trainer.cfg.epochs = 1  # one Adam step: the step between the weights whose ratio epoch 2 clips
    trainer.step()
    x = T.draw(cfg, old, cfg.batch * cfg.group, 0, cfg.stream_seed).to(device)  # samples of pi_old
    paths = graph.sample_path(x.repeat_interleave(cfg.snis, 0), noise(sepo.time_grid(cfg.steps, device))[0])
    logq = sepo.forward_path_log_prob(graph, noise, paths).view(-1, cfg.snis)
    log_r, lp = {}, {}
    for name in ("fp32", "bf16"):
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=name == "bf16"):
            lp[name], lp_old = (sepo.path_log_prob(m, graph, noise, paths, chunk_size=512).view(-1, cfg.snis)
                                for m in (trainer.model, old))
        log_r[name] = sepo.snis_log_ratio(lp[name], lp_old, logq)
    out = {"path_lp_err": (lp["bf16"] - lp["fp32"]).abs().mean().item(),
           "log_r_err": (log_r["bf16"] - log_r["fp32"]).abs().mean().item(),
           "log_r": log_r["fp32"].abs().mean().item()}
    print(f"bf16 vs fp32 on {len(paths)} paths ({cfg.steps} steps) on {device}, after {opts.warmup} + 1 "
          f"iterations: mean |error| of a path log-prob {out['path_lp_err']:.4f} nats, of a SNIS log-ratio "
          f"{out['log_r_err']:.4f}; mean |log r| {out['log_r']:.4f} (clipping starts at log(1 + clip_eps) = "
          f"{math.log1p(cfg.clip_eps):.3f})")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
