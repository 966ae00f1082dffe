"""Backward compatibility, small: convert a trained exact-attention torch model to a
Performer with one call, fine-tune it, and watch the loss recover.

    python examples/performerize.py            # about two minutes on a CPU; writes the plot
    python examples/performerize.py --quick    # seconds (what CI runs)

The paper (Choromanski et al., ICLR 2021, section 4.2 and Fig. 5) transfers a
pretrained Transformer's weights into a Performer: the converted model starts with a
worse loss (FAVOR+ only approximates the softmax attention the weights were trained
for) and recovers in a small fraction of the original training steps. Here:

1. ``exact``: a small causal language model built from torch's own modules
   (``nn.TransformerEncoder`` with pre-LayerNorm layers, a causal mask) learns to copy
   a random sequence: ``n`` tokens, a separator, the same ``n`` tokens again; the loss
   is scored on the copied half (about log(vocab - 1) before learning, 0 when copied);
2. ``favorplus.torch.performerize(model, num_features=..., seed=...)`` swaps every
   ``nn.MultiheadAttention`` for FAVOR+ attention, keeping the weights; the model code
   and its masks are unchanged;
3. ``fine-tune``: the converted model trains on for a few steps;
4. ``scratch``: for comparison, the same Performer trained from the same random
   initialisation as the exact model, for as many steps as the fine-tuning.

It prints the losses, writes them with ``--json FILE`` and plots them with ``--plot FILE``
(the full run writes ``docs/figures/performerize.png`` and ``.json`` by default).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from favorplus.torch import performerize

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


@dataclass
class Config:
    vocab: int = 12  # copied tokens 1 .. vocab - 1; 0 is the separator
    length: int = 12  # tokens to copy
    width: int = 64
    heads: int = 4
    layers: int = 2
    features: int = 32  # random features per head (head size 16)
    batch: int = 32
    pretrain_steps: int = 1200
    finetune_steps: int = 300
    lr: float = 2e-3
    finetune_lr: float = 1e-3
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0


def quick_config() -> Config:
    return Config(
        width=32,
        length=8,
        pretrain_steps=250,
        finetune_steps=80,
        eval_every=20,
        eval_batches=2,
        lr=4e-3,
        finetune_lr=2e-3,
    )


class CopyModel(nn.Module):
    """Token and position embeddings, torch's TransformerEncoder (causal), a linear head."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        seq = 2 * cfg.length
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.position = nn.Parameter(0.02 * torch.randn(seq, cfg.width))
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        x = self.encoder(x, mask=self.mask, is_causal=True)
        return self.head(self.norm(x))


def batches(cfg: Config, seed: int):
    """Inputs, targets and weights (1 on the copied half) of random copy sequences."""
    rng = np.random.default_rng(seed)
    n = cfg.length

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = rng.integers(1, cfg.vocab, size=(cfg.batch, n))
        seq = np.concatenate([tokens, np.zeros((cfg.batch, 1), tokens.dtype), tokens], axis=1)
        weights = np.zeros((cfg.batch, 2 * n), dtype=np.float32)
        weights[:, n:] = 1.0  # positions n .. 2n-1 (separator onward) predict the copy
        return (
            torch.from_numpy(seq[:, :-1]),
            torch.from_numpy(seq[:, 1:]),
            torch.from_numpy(weights),
        )

    return draw


def copy_loss(model: nn.Module, inputs, targets, weights) -> torch.Tensor:
    logits = model(inputs)
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * weights).sum() / weights.sum()


def evaluate(model: nn.Module, cfg: Config) -> float:
    draw = batches(cfg, seed=10_000 + cfg.seed)  # the same held-out batches every time
    model.eval()
    with torch.no_grad():
        loss = float(np.mean([copy_loss(model, *draw()).item() for _ in range(cfg.eval_batches)]))
    model.train()
    return loss


def train(
    model: nn.Module, cfg: Config, steps: int, lr: float, seed: int, label: str, start: int = 0
) -> list[tuple[int, float]]:
    """Adam for ``steps`` steps; the held-out loss every ``eval_every`` steps."""
    draw = batches(cfg, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    curve = [(start, evaluate(model, cfg))]
    for step in range(1, steps + 1):
        loss = copy_loss(model, *draw())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % cfg.eval_every == 0 or step == steps:
            curve.append((start + step, evaluate(model, cfg)))
            sys.stderr.write(f"\r{label:<10} step {step}/{steps} held-out loss {curve[-1][1]:.3f}")
            sys.stderr.flush()
    sys.stderr.write("\n")
    return curve


def run(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed)
    exact = CopyModel(cfg)
    init = copy.deepcopy(exact.state_dict())
    t0 = time.perf_counter()
    pretrain = train(exact, cfg, cfg.pretrain_steps, cfg.lr, seed=cfg.seed, label="exact")

    # The one call: every nn.MultiheadAttention becomes FAVOR+, weights kept.
    performer = performerize(copy.deepcopy(exact), num_features=cfg.features, seed=cfg.seed)
    converted = evaluate(performer, cfg)
    finetune = train(
        performer,
        cfg,
        cfg.finetune_steps,
        cfg.finetune_lr,
        seed=cfg.seed + 1,
        label="fine-tune",
        start=cfg.pretrain_steps,
    )

    scratch_model = CopyModel(cfg)
    scratch_model.load_state_dict(init)
    scratch_model = performerize(scratch_model, num_features=cfg.features, seed=cfg.seed)
    scratch = train(
        scratch_model, cfg, cfg.finetune_steps, cfg.lr, seed=cfg.seed + 1, label="scratch"
    )
    return {
        "config": asdict(cfg),
        "chance_loss": math.log(cfg.vocab - 1),
        "exact_final": pretrain[-1][1],
        "converted": converted,
        "finetuned_final": finetune[-1][1],
        "scratch_final": scratch[-1][1],
        "pretrain": pretrain,
        "finetune": finetune,
        "scratch": scratch,
        "seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    steps, loss = zip(*report["pretrain"], strict=True)
    ax.plot(steps, loss, color="tab:blue", label="exact attention (nn.TransformerEncoder)")
    steps, loss = zip(*report["finetune"], strict=True)
    ax.plot(steps, loss, color="tab:orange", label="after performerize(): fine-tuned FAVOR+")
    ax.plot([cfg["pretrain_steps"]], [report["converted"]], "o", color="tab:orange")
    steps, loss = zip(*report["scratch"], strict=True)
    ax.plot(steps, loss, color="tab:gray", ls="--", label="FAVOR+ from scratch")
    ax.axhline(report["chance_loss"], color="k", lw=0.6, ls=":", label="no copying, log(V - 1)")
    ax.axvline(cfg["pretrain_steps"], color="k", lw=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss on the copied half (nats)")
    ax.set_title(f"Converting a trained model: m = {cfg['features']} features per head")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (what CI runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here (full run: docs/figures/)")
    parser.add_argument("--plot", help="write the plot here (full run: docs/figures/)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = quick_config() if args.quick else Config()
    cfg.seed = args.seed
    report = run(cfg)
    print(f"exact model after {cfg.pretrain_steps} steps: loss {report['exact_final']:.3f}")
    print(f"right after performerize():         loss {report['converted']:.3f}")
    print(
        f"fine-tuned {cfg.finetune_steps} steps:             loss {report['finetuned_final']:.3f}"
    )
    print(f"FAVOR+ from scratch, {cfg.finetune_steps} steps:   loss {report['scratch_final']:.3f}")
    print(f"(no copying: {report['chance_loss']:.3f}; {report['seconds']:.0f} s)")
    json_path = args.json or (None if args.quick else FIGURES / "performerize.json")
    plot_path = args.plot or (None if args.quick else FIGURES / "performerize.png")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    if plot_path:
        plot(report, Path(plot_path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
