"""MulT: the Multimodal Transformer of Tsai et al. (ACL 2019) for unaligned word-level text (L),
audio (A) and vision (V) sequences, with every attention on ``affectkit.nn.CrossModalAttention``.

Architecture (defaults follow the paper and its reference code):

1. Per modality, a temporal Conv1d (no bias; kernel 1 by default) projects the features to the
   model width d = 30 (text first passes an input dropout).
2. Six cross-modal transformers, V->L, A->L, L->A, V->A, L->V and A->V ("A->L": L queries A).
   Each scales its inputs by sqrt(d), adds sinusoidal positions, and runs ``layers`` (5)
   pre-LayerNorm layers: ``x += Attn(LN(x), LN(source))`` (one LayerNorm for both sides, as
   the reference code) then ``x += FFN(LN(x))`` (d -> 4d -> d, ReLU); a final LayerNorm.
   The source is the same embedded sequence at every layer; 5 heads (head dimension 6).
3. Per target modality, the two cross-modal outputs are concatenated (width 2d) and pass a
   self-attention transformer of the same form (max(layers, 3) layers).
4. The last time step of each (or the mean over the valid steps, ``pooling="mean"``) is
   concatenated (6d), passes a residual block ``h + Linear(dropout(relu(Linear(h))))`` and a
   linear head: ``output_dim`` values (regression) or logits (classification).

Masks: ``causal=True`` (default) lets query i see key j iff j <= i + (Lk - Lq), the diagonal
aligned bottom-right, in every attention; the last query step sees every key. (The reference
code builds ``triu(-inf, 1 + |Lk - Lq|)``: the same when the source is at least as long as
the target; for a shorter source it lets query i see keys up to i + (Lq - Lk), where the
bottom-right mask shows the first Lq - Lk query steps no key at all, so their attention
output is zero.)

Ragged batches: per-modality valid lengths (B,) say which steps are real. Internally each
sequence is moved to the end of its padded row (right-aligned): the bottom-right causal mask
then aligns every sequence by its own lengths, padding is one (B, Lk) key mask, and the last
step is the last valid one. An item's output does not depend on padding or on the rest of
the batch.

``attention="torch"`` runs the same model (same parameter names, same state dict) with
``torch.nn.MultiheadAttention`` and explicit masks; query rows that see no key give the
output projection's bias there, as the fused op gives zero attention for them.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import CrossModalAttention

ATTENTION_BACKENDS = ("fused", "torch")
TASKS = ("regression", "classification")
POOLINGS = ("last", "mean")
MODALITIES = ("text", "audio", "vision")
# (target, source) of the six cross-modal transformers, in the paper's order.
CROSS_PAIRS = (("text", "vision"), ("text", "audio"), ("audio", "text"), ("audio", "vision"),
               ("vision", "text"), ("vision", "audio"))


def sinusoidal_positions(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embeddings (..., dim) of integer positions counted from 1; position 0 is
    padding and gets zeros. Half sines then half cosines over geometric frequencies from 1 to
    1/10000 (the fairseq form MulT uses)."""
    half = dim // 2
    step = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float64) * -step)
    angles = positions.to(torch.float64)[..., None] * freqs
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return (emb * (positions > 0)[..., None]).to(dtype)


class _Masks(NamedTuple):
    """One attention's masks in the form its backend takes."""

    key_padding: Optional[torch.Tensor]  # fused: (B, Lk), True = padding
    causal: bool  # fused: bottom-right causal mask
    blocked: Optional[torch.Tensor]  # torch: attn_mask, (Lq, Lk) or (B * H, Lq, Lk), True = blocked
    no_key: Optional[torch.Tensor]  # torch: (1 or B, Lq, 1), query rows that see no key


def _attention_masks(backend: str, heads: int, Lq: int, Lk: int, k_start, causal: bool, device) -> _Masks:
    """Masks for right-aligned sequences whose valid keys start at k_start (B,), or None when
    every key is valid. (Padded query rows need none: nothing reads them.)"""
    key_padding = None if k_start is None else torch.arange(Lk, device=device)[None, :] < k_start[:, None]
    if backend == "fused":
        return _Masks(key_padding, causal, None, None)
    if not causal and key_padding is None:
        return _Masks(None, False, None, None)
    allowed = torch.ones(1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        allowed = (j <= i + (Lk - Lq))[None]
    if key_padding is not None:
        allowed = allowed & ~key_padding[:, None, :]
    no_key = None
    if key_padding is not None or Lk < Lq:  # only then can a row see no key
        no_key = ~allowed.any(-1, keepdim=True)
        # MultiheadAttention gives NaN for such rows; open them and replace the result after.
        allowed = allowed | no_key
    if allowed.shape[0] == 1:
        return _Masks(None, False, ~allowed[0], no_key)
    return _Masks(None, False, (~allowed).repeat_interleave(heads, dim=0), no_key)


class _TransformerLayer(nn.Module):
    """Pre-LayerNorm layer: x += Attn(LN(x), LN(source)); x += FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, attention: str, attn_dropout: float, relu_dropout: float,
                 res_dropout: float) -> None:
        super().__init__()
        self.attention = attention
        if attention == "fused":
            self.attn = CrossModalAttention(dim, heads, dropout=attn_dropout)
        else:
            self.attn = nn.MultiheadAttention(dim, heads, dropout=attn_dropout, batch_first=True)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.relu_dropout, self.res_dropout = relu_dropout, res_dropout

    def _attend(self, query: torch.Tensor, source: torch.Tensor, masks: _Masks) -> torch.Tensor:
        if self.attention == "fused":
            out, _ = self.attn(query, source, source, key_padding_mask=masks.key_padding, need_weights=False,
                               is_causal=masks.causal)
            return out
        out, _ = self.attn(query, source, source, attn_mask=masks.blocked, need_weights=False)
        if masks.no_key is not None:
            bias = self.attn.out_proj.bias
            out = torch.where(masks.no_key, bias if bias is not None else torch.zeros_like(out), out)
        return out

    def forward(self, x: torch.Tensor, source: Optional[torch.Tensor], masks: _Masks) -> torch.Tensor:
        h = self.attn_norm(x)
        kv = h if source is None else self.attn_norm(source)
        x = x + F.dropout(self._attend(h, kv, masks), self.res_dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.ffn_norm(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.res_dropout, self.training)


class _Transformer(nn.Module):
    """MulT's TransformerEncoder: scale by sqrt(dim), add positions, dropout, layers, LayerNorm.
    Cross-modal when given a source (the same embedded source feeds every layer)."""

    def __init__(self, dim: int, heads: int, layers: int, attention: str, attn_dropout: float,
                 relu_dropout: float, res_dropout: float, embed_dropout: float) -> None:
        super().__init__()
        self.dim, self.heads, self.attention, self.embed_dropout = dim, heads, attention, embed_dropout
        self.layers = nn.ModuleList(
            _TransformerLayer(dim, heads, attention, attn_dropout, relu_dropout, res_dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def _embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = math.sqrt(self.dim) * x + sinusoidal_positions(positions, self.dim, x.dtype)
        return F.dropout(x, self.embed_dropout, self.training)

    def forward(self, x, x_positions, x_start, source=None, source_positions=None, source_start=None,
                causal: bool = True) -> torch.Tensor:
        """x (B, Lq, dim) and optional source (B, Lk, dim), right-aligned; *_positions (B, L)
        1-based positions (0 on padding); *_start (B,) first valid step, or None."""
        x = self._embed(x, x_positions)
        if source is None:
            kv, kv_start = None, x_start
        else:
            kv, kv_start = self._embed(source, source_positions), source_start
        Lk = x.shape[1] if kv is None else kv.shape[1]
        masks = _attention_masks(self.attention, self.heads, x.shape[1], Lk, kv_start, causal, x.device)
        for layer in self.layers:
            x = layer(x, kv, masks)
        return self.norm(x)


class MulT(nn.Module):
    """Multimodal Transformer (Tsai et al., ACL 2019) for unaligned text, audio and vision.

    Args:
        text_dim, audio_dim, vision_dim: input feature sizes (CMU-MOSEI: 300, 74, 35).
        output_dim: regression targets, or classes for ``task="classification"``.
        task: "regression" (outputs are values; ``loss`` is MulT's L1) or "classification"
            (outputs are logits; ``loss`` is cross-entropy).
        model_dim: width of every cross-modal stream (30); num_heads: attention heads (5).
        layers: cross-modal layers per transformer (5); self_layers: layers of the three
            self-attention transformers (default max(layers, 3), as MulT).
        kernel_sizes: odd Conv1d kernel sizes for (text, audio, vision) (MulT's code: 1).
        attn_dropout, attn_dropout_audio, attn_dropout_vision: attention dropout of the
            transformers whose target is text, audio, vision; relu_dropout, res_dropout,
            embed_dropout, out_dropout: dropout in the FFN, on residual branches, on the
            embedded inputs (and text features), in the output block.
        causal: the bottom-right aligned causal mask in every attention (MulT's default).
        pooling: "last" (the last valid step, MulT) or "mean" (the mean over valid steps).
        attention: "fused" (``affectkit.nn.CrossModalAttention``) or "torch"
            (``torch.nn.MultiheadAttention``); both take the same state dict.
    """

    def __init__(self, text_dim: int = 300, audio_dim: int = 74, vision_dim: int = 35, output_dim: int = 1,
                 task: str = "regression", *, model_dim: int = 30, num_heads: int = 5, layers: int = 5,
                 self_layers: Optional[int] = None, kernel_sizes=(1, 1, 1), attn_dropout: float = 0.1,
                 attn_dropout_audio: float = 0.0, attn_dropout_vision: float = 0.0, relu_dropout: float = 0.1,
                 res_dropout: float = 0.1, embed_dropout: float = 0.25, out_dropout: float = 0.0,
                 causal: bool = True, pooling: str = "last", attention: str = "fused") -> None:
        super().__init__()
        for name, value in (("text_dim", text_dim), ("audio_dim", audio_dim), ("vision_dim", vision_dim),
                            ("output_dim", output_dim), ("model_dim", model_dim), ("num_heads", num_heads),
                            ("layers", layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if model_dim % num_heads:
            raise ValueError(f"model_dim: expected a multiple of num_heads = {num_heads}, got {model_dim}")
        self_layers = max(layers, 3) if self_layers is None else self_layers
        if not isinstance(self_layers, int) or self_layers < 1:
            raise ValueError(f"self_layers: expected a positive int, got {self_layers!r}")
        if task not in TASKS:
            raise ValueError(f"task: expected one of {list(TASKS)}, got {task!r}")
        if task == "classification" and output_dim < 2:
            raise ValueError(f"output_dim: expected >= 2 classes for classification, got {output_dim}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {list(POOLINGS)}, got {pooling!r}")
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention: expected one of {list(ATTENTION_BACKENDS)}, got {attention!r}")
        kernel_sizes = tuple(kernel_sizes)
        if len(kernel_sizes) != 3 or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes: expected three odd positive ints (text, audio, vision), "
                             f"got {kernel_sizes}")
        dropouts = {"attn_dropout": attn_dropout, "attn_dropout_audio": attn_dropout_audio,
                    "attn_dropout_vision": attn_dropout_vision, "relu_dropout": relu_dropout,
                    "res_dropout": res_dropout, "embed_dropout": embed_dropout, "out_dropout": out_dropout}
        for name, p in dropouts.items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {p}")

        self.input_dims = {"text": text_dim, "audio": audio_dim, "vision": vision_dim}
        self.output_dim, self.task, self.model_dim, self.num_heads = output_dim, task, model_dim, num_heads
        self.causal, self.pooling, self.attention = bool(causal), pooling, attention
        self.embed_dropout, self.out_dropout = embed_dropout, out_dropout
        target_dropout = {"text": attn_dropout, "audio": attn_dropout_audio, "vision": attn_dropout_vision}
        common = {"attention": attention, "relu_dropout": relu_dropout, "res_dropout": res_dropout,
                  "embed_dropout": embed_dropout}

        self.proj = nn.ModuleDict({
            m: nn.Conv1d(self.input_dims[m], model_dim, k, padding=k // 2, bias=False)
            for m, k in zip(MODALITIES, kernel_sizes)
        })
        # "audio_to_text": text queries audio (the paper's A -> L).
        self.cross = nn.ModuleDict({
            f"{source}_to_{target}": _Transformer(model_dim, num_heads, layers, attn_dropout=target_dropout[target],
                                                  **common)
            for target, source in CROSS_PAIRS
        })
        self.self_attn = nn.ModuleDict({
            m: _Transformer(2 * model_dim, num_heads, self_layers, attn_dropout=target_dropout[m], **common)
            for m in MODALITIES
        })
        combined = 6 * model_dim
        self.proj1 = nn.Linear(combined, combined)
        self.proj2 = nn.Linear(combined, combined)
        self.out_layer = nn.Linear(combined, output_dim)

    def _check_inputs(self, inputs: dict, lengths: dict) -> int:
        B = None
        for m in MODALITIES:
            x, d = inputs[m], self.input_dims[m]
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{m}: expected a torch.Tensor (B, L, {d}), got {type(x).__name__}")
            if x.dim() != 3 or x.shape[-1] != d or x.shape[1] < 1:
                raise ValueError(f"{m}: expected shape (B, L >= 1, {d}), got {tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"{m}: expected a floating tensor, got {x.dtype}")
            if B is None:
                B = x.shape[0]
            elif x.shape[0] != B:
                raise ValueError(f"{m}: expected batch size {B} (that of text), got {x.shape[0]}")
        for m in MODALITIES:
            n = lengths[m]
            if n is None:
                continue
            name, L = f"{m}_lengths", inputs[m].shape[1]
            if not isinstance(n, torch.Tensor):
                raise TypeError(f"{name}: expected an int tensor (B,), got {type(n).__name__}")
            if n.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name}: expected dtype int32 or int64, got {n.dtype}")
            if n.shape != (B,):
                raise ValueError(f"{name}: expected shape ({B},) (the batch size), got {tuple(n.shape)}")
            if n.device != inputs[m].device:
                raise ValueError(f"{name}: expected a tensor on {inputs[m].device} (that of {m}), got {n.device}")
            if not torch.compiler.is_compiling() and B:  # a data-dependent check; eager only
                lo, hi = (int(v) for v in torch.aminmax(n))
                if lo < 1 or hi > L:
                    raise ValueError(f"{name}: expected values in [1, {L}] ({m}.shape[1]), got {lo if lo < 1 else hi}")
        return B

    def _embed_modality(self, m: str, x: torch.Tensor, n: Optional[torch.Tensor]):
        """Project one modality; returns (right-aligned (B, L, d), 1-based positions (B, L), start or None)."""
        B, L, _ = x.shape
        steps = torch.arange(L, device=x.device)
        start = None
        if n is not None:
            start = L - n.to(torch.int64)
            # Right-align: step t of the output holds step t - start of the input (padding wraps
            # to the front and is zeroed, so a temporal kernel sees zeros there).
            index = (steps[None, :] - start[:, None]) % L
            x = torch.gather(x, 1, index[..., None].expand(B, L, x.shape[2]))
            x = x * (steps[None, :] >= start[:, None])[..., None].to(x.dtype)
            positions = (steps[None, :] - start[:, None] + 1).clamp(min=0)
        else:
            positions = (steps + 1).expand(B, L)
        if m == "text":
            x = F.dropout(x, self.embed_dropout, self.training)
        x = self.proj[m](x.transpose(1, 2)).transpose(1, 2)
        return x, positions, start

    def _pool(self, h: torch.Tensor, start: Optional[torch.Tensor]) -> torch.Tensor:
        if self.pooling == "last":
            return h[:, -1]
        if start is None:
            return h.mean(1)
        valid = (torch.arange(h.shape[1], device=h.device)[None, :] >= start[:, None]).to(h.dtype)
        return (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)

    def forward(self, text: torch.Tensor, audio: torch.Tensor, vision: torch.Tensor, *,
                text_lengths: Optional[torch.Tensor] = None, audio_lengths: Optional[torch.Tensor] = None,
                vision_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text (B, Lt, text_dim), audio (B, La, audio_dim), vision (B, Lv, vision_dim), each
        padded at the end; *_lengths (B,) valid steps in [1, L] (default: all). Returns
        (B, output_dim)."""
        inputs = {"text": text, "audio": audio, "vision": vision}
        lengths = {"text": text_lengths, "audio": audio_lengths, "vision": vision_lengths}
        self._check_inputs(inputs, lengths)
        embedded = {m: self._embed_modality(m, inputs[m], lengths[m]) for m in MODALITIES}
        crossed = {}
        for target, source in CROSS_PAIRS:
            (x, x_pos, x_start), (s, s_pos, s_start) = embedded[target], embedded[source]
            crossed[target, source] = self.cross[f"{source}_to_{target}"](
                x, x_pos, x_start, s, s_pos, s_start, causal=self.causal)
        pooled = []
        for m in MODALITIES:
            _, pos, start = embedded[m]
            pair = torch.cat([crossed[t, s] for t, s in CROSS_PAIRS if t == m], dim=-1)
            pooled.append(self._pool(self.self_attn[m](pair, pos, start, causal=self.causal), start))
        h = torch.cat(pooled, dim=-1)
        h = h + self.proj2(F.dropout(F.relu(self.proj1(h)), self.out_dropout, self.training))
        return self.out_layer(h)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MulT's training loss: L1 for regression (targets (B, output_dim) or (B,) when
        output_dim is 1), cross-entropy for classification (class indices (B,))."""
        if self.task == "classification":
            return F.cross_entropy(outputs, targets)
        if targets.shape != outputs.shape and self.output_dim == 1 and targets.shape == outputs.shape[:1]:
            targets = targets[:, None]
        if targets.shape != outputs.shape:
            raise ValueError(f"targets: expected shape {tuple(outputs.shape)}, got {tuple(targets.shape)}")
        return F.l1_loss(outputs, targets.to(outputs.dtype))
