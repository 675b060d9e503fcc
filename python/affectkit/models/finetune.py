"""Fine-tuning the top layers of the sentence encoder jointly with a text model's head.

The frozen bottom of the encoder runs once per text (its token states stay in memory); each
step runs the tuned layers, mean-pools, L2-normalises (as the frozen embedding is), joins the
lexicon features and goes through the model's `Head` (MLP plus the optional hashed n-gram
layer). The encoder learns at a small rate, the head at its own. Each epoch is scored on dev
by `score(dev_outputs)`; the best epoch's weights are kept.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..text.utterance_encoder import UtteranceEncoder
from .base import Head, sparse_tensor


class TunedTextNet(nn.Module):
    """(token states, lexicon rows, hashed n-grams) -> head outputs."""

    def __init__(self, encoder: UtteranceEncoder, head: Head) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def embed(self, states: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.encoder.pool(states), dim=1)

    def forward(self, states, lexicon: torch.Tensor, sparse=None) -> torch.Tensor:
        return self.head(torch.cat([self.embed(states), lexicon], dim=1), sparse)


def frozen_states(encoder: UtteranceEncoder, texts: list[str], progress: bool = False, step: int = 1024):
    from rich.progress import Progress

    out = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("encoding (frozen layers)", total=len(texts))
        for i in range(0, len(texts), step):
            out += encoder.frozen_states(texts[i:i + step])
            bar.advance(task, min(step, len(texts) - i))
    return out


@torch.no_grad()
def run_net(net: TunedTextNet, states, lexicon: np.ndarray, sparse=None, batch: int = 512) -> np.ndarray:
    net.eval()
    out = []
    for i in range(0, len(states), batch):
        s = sparse_tensor(sparse[i:i + batch]) if sparse is not None else None
        out.append(net(states[i:i + batch], torch.from_numpy(lexicon[i:i + batch]), s).double().numpy())
    return np.concatenate(out)


def finetune(net: TunedTextNet, train: tuple, dev: tuple, *, loss: str, score, lr: float, encoder_lr: float,
             weight_decay: float, epochs: int, batch: int, sparse_lr: float = 1e-3, seed: int = 0,
             progress: bool = False, log=None) -> dict:
    """Train `net` in place on train = (states, lexicon, targets, sparse or None); dev likewise.
    score(dev outputs) -> float, higher is better; the best epoch's weights are restored."""
    torch.manual_seed(seed)
    states, lexicon, targets, sparse = train
    crit = nn.BCEWithLogitsLoss() if loss == "bce" else nn.MSELoss()
    head = net.head
    groups = [{"params": list(net.encoder.parameters()), "lr": encoder_lr, "weight_decay": weight_decay},
              {"params": list(head.net.parameters()), "lr": lr, "weight_decay": weight_decay}]
    if head.sparse_dim:
        groups.append({"params": [head.sparse_weight], "lr": sparse_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, foreach=True)
    steps = epochs * int(np.ceil(len(states) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps,
                                                pct_start=0.1, anneal_strategy="linear")
    lex_t, y_t = torch.from_numpy(lexicon), torch.from_numpy(np.asarray(targets, dtype=np.float32))
    rng = np.random.default_rng(seed)
    # Under torch.distributed every rank holds all rows and draws the same permutation; each
    # takes its share of every batch and DDP averages the gradients.
    from .training import _dist_rank_world

    rank, world = _dist_rank_world()
    model = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)
    best, best_score, history, start = None, -np.inf, [], time.perf_counter()
    from rich.progress import Progress

    with Progress(disable=not progress or rank != 0, transient=True) as bar:
        task = bar.add_task("fine-tuning", total=steps)
        for epoch in range(epochs):
            net.train()
            for idx in np.array_split(rng.permutation(len(states)), int(np.ceil(len(states) / batch))):
                bar.advance(task)
                if len(idx) < world:
                    continue  # every rank must take part in each step
                idx = idx[rank::world]
                s = sparse_tensor(sparse[idx]) if sparse is not None else None
                out = model([states[i] for i in idx], lex_t[idx], s)
                opt.zero_grad()
                crit(out, y_t[idx]).backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                sched.step()
            value = float(score(run_net(net, dev[0], dev[1], dev[3])))
            history.append(round(value, 4))
            if log is not None:
                log(f"epoch {epoch + 1}: dev score {value:.4f} ({time.perf_counter() - start:.0f} s)")
            if value > best_score:
                best, best_score = copy.deepcopy(net.state_dict()), value
    net.load_state_dict(best)
    net.eval()
    info = {"dev_score_per_epoch": history, "best_epoch": int(np.argmax(history)) + 1,
            "finetune_seconds": time.perf_counter() - start}
    if world > 1:
        from .training import _check_ranks_agree

        _check_ranks_agree(net)
        info["world_size"] = world
    return info
