"""Train a small Performer language model on a copying task, with torch or with JAX.

    python examples/train_copy.py --framework torch            # a few minutes on a CPU
    python examples/train_copy.py --framework jax --quick      # seconds (what CI runs)

Each sequence is ``n`` random tokens, a separator, and the same ``n`` tokens again; a
causal transformer (token and position embeddings, pre-LayerNorm blocks, an MLP) is
trained to predict the next token, and scored on the copied half, where a perfect
model has zero loss and a model that has not learned to copy has about log(vocab).
Three models, identical but for their attention, are trained from the same
initialisation on the same batches:

* ``exact``: the framework's own attention (``torch.nn.MultiheadAttention``,
  ``flax.nnx.MultiHeadAttention``) with a causal mask;
* ``favor``: :class:`favorplus.torch.FavorAttention` / :class:`favorplus.flax.FavorAttention`
  (causal FAVOR+, a fixed random projection);
* ``favor+redraw``: the same, with the projection redrawn every ``--redraw`` steps.

It prints the loss on the copied half over training and, at the end, the loss and
the copy accuracy on held-out sequences; ``--json FILE`` writes them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

VARIANTS = ("exact", "favor", "favor+redraw")


@dataclass
class Config:
    framework: str = "torch"
    vocab: int = 16  # copied tokens are 1 .. vocab - 1; 0 is the separator
    length: int = 16  # tokens to copy
    width: int = 64
    heads: int = 4
    layers: int = 2
    features: int = 64  # random features per head
    batch: int = 32
    steps: int = 1000
    lr: float = 3e-3
    redraw: int = 100
    seed: int = 0
    eval_batches: int = 8
    log_every: int = 100

    @property
    def seq_len(self) -> int:
        return 2 * self.length + 1


@dataclass
class Result:
    variant: str
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: float = math.nan
    eval_accuracy: float = math.nan
    seconds: float = 0.0


def batches(cfg: Config, seed: int) -> Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A generator of (inputs, targets, weights): weights are 1 on the copied half."""
    rng = np.random.default_rng(seed)
    n = cfg.length

    def draw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens = rng.integers(1, cfg.vocab, size=(cfg.batch, n))
        sep = np.zeros((cfg.batch, 1), dtype=tokens.dtype)
        seq = np.concatenate([tokens, sep, tokens], axis=1)
        weights = np.zeros((cfg.batch, 2 * n), dtype=np.float32)
        weights[:, n:] = 1.0  # inputs n .. 2n-1 (separator onward) predict the copy
        return seq[:, :-1], seq[:, 1:], weights

    return draw


def progress(label: str, step: int, total: int, loss: float) -> None:
    done = int(24 * step / max(total, 1))
    sys.stderr.write(
        f"\r{label:<13} [{'#' * done}{'.' * (24 - done)}] {step}/{total} loss {loss:.3f}"
    )
    sys.stderr.flush()
    if step == total:
        sys.stderr.write("\n")


# ---------------------------------------------------------------------------------------
# PyTorch


def run_torch(cfg: Config, variant: str) -> Result:
    import torch
    from torch import nn

    from favorplus.torch import FavorAttention, redraw_projections

    torch.manual_seed(cfg.seed)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(cfg.width)
            self.norm2 = nn.LayerNorm(cfg.width)
            if variant == "exact":
                self.attn: nn.Module = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
            else:
                # The drop-in: same arguments, same parameters, same call.
                self.attn = FavorAttention(
                    cfg.width,
                    cfg.heads,
                    batch_first=True,
                    causal=True,
                    num_features=cfg.features,
                    seed=cfg.seed + 1,
                )
            self.mlp = nn.Sequential(
                nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width)
            )

        def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
            h = self.norm1(x)
            x = x + self.attn(h, h, h, attn_mask=causal_mask, is_causal=True, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(cfg.vocab, cfg.width)
            self.pos = nn.Parameter(torch.randn(cfg.seq_len - 1, cfg.width) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.layers))
            self.norm = nn.LayerNorm(cfg.width)
            self.head = nn.Linear(cfg.width, cfg.vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            length = tokens.shape[1]
            mask = torch.ones(length, length, dtype=torch.bool).triu(1)  # True: not allowed
            x = self.tok(tokens) + self.pos[:length]
            for block in self.blocks:
                x = block(x, mask)
            return self.head(self.norm(x))

    model = Model()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def loss_fn(inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> tuple[Any, Any]:
        logits = model(torch.as_tensor(inputs))
        nll = nn.functional.cross_entropy(
            logits.transpose(1, 2), torch.as_tensor(targets), reduction="none"
        )
        w = torch.as_tensor(weights)
        correct = (logits.argmax(-1) == torch.as_tensor(targets)).float()
        return (nll * w).sum() / w.sum(), (correct * w).sum() / w.sum()

    result = Result(variant)
    draw = batches(cfg, cfg.seed)
    start = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        loss, _ = loss_fn(*draw())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if variant == "favor+redraw" and step % cfg.redraw == 0 and step < cfg.steps:
            redraw_projections(model)
        if step % cfg.log_every == 0 or step == cfg.steps:
            result.losses.append((step, float(loss)))
            progress(f"torch {variant}", step, cfg.steps, float(loss))
    result.seconds = time.perf_counter() - start
    model.eval()
    held_out = batches(cfg, cfg.seed + 10_000)
    with torch.no_grad():
        stats = [loss_fn(*held_out()) for _ in range(cfg.eval_batches)]
    result.eval_loss = float(np.mean([float(s[0]) for s in stats]))
    result.eval_accuracy = float(np.mean([float(s[1]) for s in stats]))
    return result


# ---------------------------------------------------------------------------------------
# JAX (Flax NNX)


def run_jax(cfg: Config, variant: str) -> Result:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from favorplus.flax import FavorAttention, redraw_projections

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.norm1 = nnx.LayerNorm(cfg.width, rngs=rngs)
            self.norm2 = nnx.LayerNorm(cfg.width, rngs=rngs)
            if variant == "exact":
                self.attn: Any = nnx.MultiHeadAttention(
                    cfg.heads, cfg.width, decode=False, rngs=rngs
                )
            else:
                self.attn = FavorAttention(
                    cfg.heads,
                    cfg.width,
                    causal=True,
                    num_features=cfg.features,
                    seed=cfg.seed + 1,
                    rngs=rngs,
                )
            self.fc1 = nnx.Linear(cfg.width, 4 * cfg.width, rngs=rngs)
            self.fc2 = nnx.Linear(4 * cfg.width, cfg.width, rngs=rngs)

        def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
            h = self.norm1(x)
            if variant == "exact":
                x = x + self.attn(h, mask=mask)
            else:
                x = x + self.attn(h)
            return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.tok = nnx.Embed(cfg.vocab, cfg.width, rngs=rngs)
            self.pos = nnx.Param(
                jax.random.normal(rngs.params(), (cfg.seq_len - 1, cfg.width)) * 0.02
            )
            self.blocks = nnx.List([Block(rngs) for _ in range(cfg.layers)])
            self.norm = nnx.LayerNorm(cfg.width, rngs=rngs)
            self.head = nnx.Linear(cfg.width, cfg.vocab, rngs=rngs)

        def __call__(self, tokens: jax.Array) -> jax.Array:
            length = tokens.shape[1]
            mask = nnx.make_causal_mask(jnp.ones((1, length)))
            x = self.tok(tokens) + self.pos[...][:length]
            for block in self.blocks:
                x = block(x, mask)
            return self.head(self.norm(x))

    model = Model(nnx.Rngs(cfg.seed))
    optimizer = nnx.Optimizer(model, optax.adam(cfg.lr), wrt=nnx.Param)

    def loss_fn(model: Model, inputs: Any, targets: Any, weights: Any) -> tuple[Any, Any]:
        logits = model(inputs)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        return jnp.sum(nll * weights) / jnp.sum(weights), jnp.sum(correct * weights) / jnp.sum(
            weights
        )

    @nnx.jit
    def train_step(
        model: Model, optimizer: nnx.Optimizer, inputs: Any, targets: Any, w: Any
    ) -> Any:
        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, inputs, targets, w)
        optimizer.update(model, grads)
        return loss

    evaluate = nnx.jit(loss_fn)
    result = Result(variant)
    draw = batches(cfg, cfg.seed)
    key = jax.random.key(cfg.seed + 2)
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        loss = train_step(model, optimizer, *draw())
        if variant == "favor+redraw" and step % cfg.redraw == 0 and step < cfg.steps:
            key, sub = jax.random.split(key)
            redraw_projections(model, sub)  # outside the jitted step: drawn on the host
        if step % cfg.log_every == 0 or step == cfg.steps:
            result.losses.append((step, float(loss)))
            progress(f"jax {variant}", step, cfg.steps, float(loss))
    result.seconds = time.perf_counter() - start
    held_out = batches(cfg, cfg.seed + 10_000)
    stats = [evaluate(model, *held_out()) for _ in range(cfg.eval_batches)]
    result.eval_loss = float(np.mean([float(s[0]) for s in stats]))
    result.eval_accuracy = float(np.mean([float(s[1]) for s in stats]))
    return result


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=("torch", "jax"), default="torch")
    parser.add_argument("--quick", action="store_true", help="a short run (what CI runs)")
    parser.add_argument("--steps", type=int, help="training steps (default 1000; quick 200)")
    parser.add_argument("--redraw", type=int, help="steps between redraws (default 100; quick 50)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    cfg = Config(framework=args.framework, seed=args.seed)
    if args.quick:
        cfg.steps, cfg.redraw, cfg.log_every, cfg.length = 200, 50, 50, 8
    if args.steps is not None:
        cfg.steps = args.steps
    if args.redraw is not None:
        cfg.redraw = args.redraw
    runner = run_torch if args.framework == "torch" else run_jax
    results = [runner(cfg, variant) for variant in args.variants]

    chance = math.log(cfg.vocab - 1)
    print(
        f"\n{args.framework}: copy {cfg.length} tokens (vocab {cfg.vocab - 1}), {cfg.steps} steps,"
    )
    print(
        f"loss on the copied half; not copying costs about log({cfg.vocab - 1}) = {chance:.2f}"
    )
    steps = [s for s, _ in results[0].losses]
    print(f"{'step':>6} " + " ".join(f"{r.variant:>13}" for r in results))
    for i, s in enumerate(steps):
        print(f"{s:>6} " + " ".join(f"{r.losses[i][1]:>13.4f}" for r in results))
    print(f"{'held-out loss':>20} " + " ".join(f"{r.eval_loss:>13.4f}" for r in results))
    print(f"{'held-out accuracy':>20} " + " ".join(f"{r.eval_accuracy:>13.3f}" for r in results))
    print(f"{'seconds':>20} " + " ".join(f"{r.seconds:>13.1f}" for r in results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "config": asdict(cfg),
                    "chance_loss": chance,
                    "results": [asdict(r) for r in results],
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
