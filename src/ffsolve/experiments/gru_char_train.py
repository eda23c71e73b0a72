"""`ffsolve train gru`: a character-level GRU language model on a text that ships with Python.

Truncated BPTT: the training text is cut into `batch_size` contiguous streams, read in chunks
of `chunk` characters, the state carried (detached) from one chunk to the next. Validation
bits per character are measured the same way on the held-out tail of the text. The checkpoint
(kind "gru-char") also keeps the first `heldout_chars` characters of the held-out text: the
input `rnn-forward` feeds the trained cell, identical on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ffsolve.checkpoint import check_training_output
from ffsolve.config import Config, config_to_dict, spec
from ffsolve.data import TEXT_SOURCES, TEXT_VOCAB, decode_text, encode_text, load_text
from ffsolve.errors import DataError
from ffsolve.experiments import RunContext, Trainer, register_trainer
from ffsolve.models.char_gru import CharGRU, CharGRUConfig, load_char_gru, save_char_gru
from ffsolve.training import Fit, Loop, Task, cosine, fit

__all__ = ["GRUCharTrainConfig", "evaluate_bpc", "train"]


@dataclass(frozen=True)
class GRUCharTrainConfig(Config):
    """Text, model size and optimisation of `ffsolve train gru`.

    Attributes:
        text: a text shipped with Python (`ffsolve.data.TEXT_SOURCES`), used unless
            `text_file` names a UTF-8 file.
        max_chars: use only the first N characters of the text (None: all).
        valid_fraction: the tail of the text held out for validation.
        hidden: GRU state size.
        chunk: characters per truncated-BPTT chunk.
        batch_size: parallel streams of the training text.
        epochs, lr, lr_final (cosine decay), clip (gradient norm; 0: off), seed.
        heldout_chars: held-out characters kept in the checkpoint (rnn-forward's input).
        save_to: checkpoint stem (default <run dir>/gru_char); save_every: epochs per save.
    """

    text: str = spec("pydoc-topics", choices=tuple(TEXT_SOURCES))
    text_file: str | None = None
    max_chars: int | None = spec(None, ge=100)
    valid_fraction: float = spec(0.1, gt=0.0, lt=1.0)
    hidden: int = spec(64, ge=1)
    chunk: int = spec(128, ge=2)
    batch_size: int = spec(32, ge=1)
    epochs: int = spec(20, ge=1)
    lr: float = spec(3e-3, gt=0.0)
    lr_final: float = spec(1e-4, ge=0.0)
    clip: float = spec(1.0, ge=0.0)
    heldout_chars: int = spec(20000, ge=1)
    seed: int = spec(0, ge=0)
    save_to: str | None = None
    save_every: int = spec(1, ge=1)


def _streams(ids: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) ids -> (n, N // n): n contiguous streams (the remainder dropped)."""
    length = len(ids) // n
    return ids[: n * length].reshape(n, length)


@torch.no_grad()
def evaluate_bpc(model: CharGRU, ids: torch.Tensor, chunk: int, streams: int = 8) -> float:
    """Bits per character of predicting ids[t + 1] from ids[:t + 1], over `streams` contiguous
    streams read chunk by chunk with the state carried (as in training)."""
    model.eval()
    data = _streams(ids, min(streams, max(1, (len(ids) - 1) // 2)))  # (S, L)
    h, total, count = None, 0.0, 0
    for i in range(0, data.shape[1] - 1, chunk):
        x, y = data[:, i : i + chunk], data[:, i + 1 : i + chunk + 1]
        x = x[:, : y.shape[1]]
        logits, h = model(x, h)  # (S, L', vocab)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return total / max(count, 1) / math.log(2)


@torch.no_grad()
def _sample(model: CharGRU, prompt: torch.Tensor, n: int, seed: int) -> str:
    """n characters drawn after `prompt` (seeded)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits, h = model(prompt[None])
    out = []
    for _ in range(n):
        p = F.softmax(logits[0, -1].float().cpu(), -1)
        c = torch.multinomial(p, 1, generator=g).to(prompt.device)
        out.append(int(c))
        logits, h = model(c[None], h)
    return decode_text(torch.tensor(out))


def train(cfg: GRUCharTrainConfig, ctx: RunContext) -> dict[str, Any]:
    path = cfg.save_to or str(ctx.out_dir / "gru_char")
    check_training_output(path, named=cfg.save_to is not None, force=ctx.force, resume=ctx.resume)
    text = load_text(cfg.text, cfg.text_file)[: cfg.max_chars]
    ids = encode_text(text)
    n_valid = int(len(ids) * cfg.valid_fraction)
    if n_valid < 3 or len(ids) - n_valid < cfg.batch_size * 2:
        raise DataError(
            f"text of {len(ids)} characters is too short for valid_fraction "
            f"{cfg.valid_fraction} and batch_size {cfg.batch_size}"
        )
    train_ids, valid_ids = ids[:-n_valid].to(ctx.device), ids[-n_valid:].to(ctx.device)
    source = cfg.text_file or f"{cfg.text} ({TEXT_SOURCES[cfg.text]})"
    torch.manual_seed(cfg.seed)
    model = CharGRU(CharGRUConfig(vocab=len(TEXT_VOCAB) + 1, hidden=cfg.hidden)).to(ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    data = _streams(train_ids, cfg.batch_size)  # (B, L)
    steps_per_epoch = math.ceil((data.shape[1] - 1) / cfg.chunk)
    ctx.log(
        f"GRU hidden {cfg.hidden}, {n_params} parameters; {len(train_ids)} train / "
        f"{n_valid} valid characters of {source}"
    )
    heldout = valid_ids[: cfg.heldout_chars]
    carried: list[torch.Tensor | None] = [None]  # the state carried from chunk to chunk

    def plan(g: torch.Generator) -> range:
        # a random shift per epoch moves the chunk boundaries (the state is reset there)
        shift = min(int(torch.randint(cfg.chunk, (1,), generator=g)), data.shape[1] - 2)
        carried[0] = None
        return range(shift, data.shape[1] - 1, cfg.chunk)

    def loss(i: int, g: torch.Generator) -> torch.Tensor:
        x, y = data[:, i : i + cfg.chunk], data[:, i + 1 : i + cfg.chunk + 1]
        x = x[:, : y.shape[1]]
        logits, h = model(x, carried[0])  # (B, L, vocab), (1, B, H)
        carried[0] = h.detach()  # truncated BPTT
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())  # nats

    def save(run: Fit, final: bool) -> Path:
        meta = {
            "text": source,
            "vocab_chars": TEXT_VOCAB,
            "heldout": f"the first {len(heldout)} characters of the held-out tail",
            "train_chars": len(train_ids),
            "valid_chars": n_valid,
            "valid_bits_per_char": run.final["valid_bpc"],
            "epochs": run.epoch,
        }
        return save_char_gru(path, model, heldout, meta)

    task = Task(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        lr=cosine(cfg.lr, cfg.lr_final),
        plan=plan,
        loss=loss,
        evaluate=lambda m: {"valid_bpc": evaluate_bpc(m, valid_ids, cfg.chunk)},
        save=save,
        load=lambda p: load_char_gru(p, ctx.device)[0],
        test_key="valid_bpc",
        train_key="train_bpc",
        train_scale=1 / math.log(2),  # nats -> bits
        steps_per_epoch=steps_per_epoch,
        clip=cfg.clip,
    )
    # the state is carried across the chunks of an epoch: saves only at an epoch's end
    loop = Loop(epochs=cfg.epochs, save_every=cfg.save_every, checkpoint_each_save=True)
    same = {k: v for k, v in config_to_dict(cfg).items() if k != "save_every"}
    g = torch.Generator().manual_seed(cfg.seed)
    run = fit(task, loop, ctx, path, same=same, generator=g, resume=ctx.resume)
    history, saved = run.history, run.checkpoint
    model, _, meta = load_char_gru(path, ctx.device)
    prompt = valid_ids[:40]
    sample = _sample(model, prompt, 200, cfg.seed)
    ctx.log(f"checkpoint: {saved} (valid {meta['valid_bits_per_char']:.4f} bits/char)")
    return {
        "history": history,
        "checkpoint": str(saved),
        "num_params": n_params,
        "text": source,
        "train_chars": len(train_ids),
        "valid_chars": n_valid,
        "valid_bits_per_char": meta["valid_bits_per_char"],
        "sample_prompt": decode_text(prompt.cpu()),
        "sample": sample,
    }


def summary(records: dict[str, Any]) -> str:
    h = records["history"]
    return (
        f"valid {h[-1]['valid_bpc']:.4f} bits/char (initial {h[0]['valid_bpc']:.4f}) after "
        f"{h[-1]['epoch']} epochs ({h[-1]['elapsed_s']:.0f} s); checkpoint {records['checkpoint']}"
        f"\nsample after {records['sample_prompt']!r}:\n{records['sample']}"
    )


register_trainer(
    Trainer(
        name="gru",
        description="a character-level GRU language model on a text shipped with Python",
        config=GRUCharTrainConfig,
        train=train,
        summary=summary,
    )
)
