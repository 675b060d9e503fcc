"""M2FNet (Chudasama et al., CVPR-W 2022): multimodal emotion recognition in conversation.

Per modality, utterance features of a dialogue are projected to the model width, given the
speaker's embedding and the utterance position, and contextualised across the dialogue by
transformer encoder layers. The fusion stack (``affectkit.nn.MultimodalFusion``) then lets the
text stream attend to every other modality, and an MLP classifies each utterance.

Dialogues are ragged: a batch is padded to its longest dialogue and every attention reads the
per-dialogue ``lengths`` through the fused kernel, so padding costs no attention work and
never leaks into valid utterances. ``to_torch_attention`` returns the same model (same
weights) running on ``torch.nn.MultiheadAttention``, the stock path we compare against.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..nn.attention import CrossModalAttention, MultimodalFusion

MAX_SPEAKERS = 9  # speakers are numbered by first appearance in the dialogue; later ones share the last slot


class DialogueEncoderLayer(nn.Module):
    """Post-LayerNorm transformer encoder layer over the utterances of each dialogue."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attn = CrossModalAttention(d_model, num_heads, dropout=dropout)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if isinstance(self.attn, CrossModalAttention):
            a, _ = self.attn(x, x, x, need_weights=False, kv_lengths=lengths, q_lengths=lengths)
        else:  # torch.nn.MultiheadAttention after to_torch_attention
            a, _ = self.attn(x, x, x, key_padding_mask=_padding(lengths, x.shape[1]), need_weights=False)
        x = self.norm1(x + self.drop(a))
        return self.norm2(x + self.drop(self.ffn(x)))


class ModalityEncoder(nn.Module):
    """Utterance features of one modality -> contextualised (B, L, d_model)."""

    def __init__(self, in_dim: int, d_model: int, num_heads: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        # LayerNorm first: features of any source and scale (embeddings, lexicon counts, audio
        # statistics) enter on one footing.
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, d_model))
        self.speaker = nn.Embedding(MAX_SPEAKERS, d_model)
        self.layers = nn.ModuleList(DialogueEncoderLayer(d_model, num_heads, 2 * d_model, dropout)
                                    for _ in range(num_layers))
        nn.init.normal_(self.speaker.weight, std=0.02)

    def forward(self, feats, speakers, positions, lengths):
        x = self.proj(feats) + self.speaker(speakers) + positions
        for layer in self.layers:
            x = layer(x, lengths)
        return x


def _padding(lengths: torch.Tensor, L: int) -> torch.Tensor:
    """(B, L) True at padded positions (MultiheadAttention's key_padding_mask)."""
    return torch.arange(L, device=lengths.device)[None, :] >= lengths[:, None]


def _positions(L: int, d: int, device, dtype) -> torch.Tensor:
    """Sinusoidal encoding of the utterance index, (L, d)."""
    pos = torch.arange(L, device=device, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / d))
    enc = torch.zeros(L, d, device=device, dtype=torch.float64)
    enc[:, 0::2] = torch.sin(pos * freq)
    enc[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return enc.to(dtype)


class M2FNet(nn.Module):
    """M2FNet over per-utterance features of each modality.

    Args:
        text_dim: width of the text utterance features (e.g. 384 for MiniLM embeddings).
        other_dims: widths of the optional other modalities' utterance features (audio,
            visual, ...), in the order they are passed to ``forward``; () for text only.
        num_classes: 7 for MELD's emotions.
        d_model, num_heads, num_layers: dialogue encoder per modality.
        fusion_layers: layers of the multi-head attention fusion (used when other_dims).
        dropout: everywhere (attention included) in training.
    """

    def __init__(self, text_dim: int, other_dims: Sequence[int] = (), num_classes: int = 7, *, d_model: int = 256,
                 num_heads: int = 4, num_layers: int = 2, fusion_layers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        if d_model <= 0 or num_heads <= 0 or d_model % num_heads:
            raise ValueError(f"d_model: expected a positive multiple of num_heads = {num_heads}, got {d_model}")
        for name, value in (("text_dim", text_dim), ("num_classes", num_classes), ("num_layers", num_layers)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value}")
        self.text_dim, self.other_dims, self.num_classes = int(text_dim), [int(d) for d in other_dims], int(num_classes)
        self.d_model = d_model
        self.encoders = nn.ModuleList(ModalityEncoder(d, d_model, num_heads, num_layers, dropout)
                                      for d in [self.text_dim, *self.other_dims])
        self.fusion = (MultimodalFusion(d_model, num_heads, [d_model] * len(self.other_dims), fusion_layers, dropout)
                       if self.other_dims else None)
        self.classifier = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(d_model, self.num_classes))

    def forward(self, text: torch.Tensor, speakers: torch.Tensor, lengths: torch.Tensor,
                others: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """text (B, L, text_dim); speakers (B, L) ints in [0, MAX_SPEAKERS) (see speaker_ids);
        lengths (B,) utterances per dialogue, 1..L; others: one (B, L, d_m) per other modality.
        Returns logits (B, L, num_classes); rows past a dialogue's length are zeros."""
        self._check(text, speakers, lengths, others)
        B, L, _ = text.shape
        pos = _positions(L, self.d_model, text.device, text.dtype)
        streams = [enc(x, speakers, pos, lengths) for enc, x in zip(self.encoders, [text, *others])]
        fused = streams[0]
        if self.fusion is not None:
            fused = self.fusion(streams[0], streams[1:], lengths)
        logits = self.classifier(torch.cat([streams[0], fused], dim=-1))
        return logits * (~_padding(lengths, L))[..., None]

    def _check(self, text, speakers, lengths, others) -> None:
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[-1] != self.text_dim:
            got = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"text: expected a (B, L, {self.text_dim}) tensor, got {got}")
        B, L, _ = text.shape
        if not isinstance(speakers, torch.Tensor) or speakers.shape != (B, L) or speakers.dtype != torch.long:
            got = (tuple(speakers.shape), speakers.dtype) if isinstance(speakers, torch.Tensor) else type(speakers).__name__
            raise ValueError(f"speakers: expected a (B, L) = {(B, L)} int64 tensor, got {got}")
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
            got = (tuple(lengths.shape), lengths.dtype) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise ValueError(f"lengths: expected a ({B},) int tensor, got {got}")
        if len(others) != len(self.other_dims):
            raise ValueError(f"others: expected {len(self.other_dims)} modality tensors, got {len(others)}")
        for m, (y, d) in enumerate(zip(others, self.other_dims)):
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (B, L, d):
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"others[{m}]: expected shape {(B, L, d)} (aligned with text), got {got}")
        if not torch.compiler.is_compiling():
            if B and (int(lengths.min()) < 1 or int(lengths.max()) > L):
                raise ValueError(f"lengths: expected values in [1, {L}], got [{int(lengths.min())}, {int(lengths.max())}]")
            if B and (int(speakers.min()) < 0 or int(speakers.max()) >= MAX_SPEAKERS):
                raise ValueError(f"speakers: expected ids in [0, {MAX_SPEAKERS}), got [{int(speakers.min())}, {int(speakers.max())}]")

    def to_torch_attention(self) -> "M2FNet":
        """A copy with the same weights whose attention runs on torch.nn.MultiheadAttention."""
        model = copy.deepcopy(self)
        for enc in model.encoders:
            for layer in enc.layers:
                layer.attn = _as_multihead(layer.attn)
        if model.fusion is not None:
            model.fusion = TorchFusion(model.fusion)
        return model


def _as_multihead(block: CrossModalAttention) -> nn.MultiheadAttention:
    p = block.in_proj_weight if block.in_proj_weight is not None else block.q_proj_weight
    mha = nn.MultiheadAttention(block.embed_dim, block.num_heads, dropout=block.dropout, bias=block.in_proj_bias is not None,
                                kdim=block.kdim, vdim=block.vdim, batch_first=True, device=p.device, dtype=p.dtype)
    mha.load_state_dict(block.state_dict())
    return mha.train(block.training)


class TorchFusion(nn.Module):
    """MultimodalFusion computed with one torch.nn.MultiheadAttention per (layer, modality):
    the reference path, holding copies of the fused module's weights."""

    def __init__(self, fusion: MultimodalFusion) -> None:
        super().__init__()
        M = len(fusion.modality_dims)
        self.blocks = nn.ModuleList(
            nn.ModuleList(_as_multihead(fusion.attention_block(i, m)) for m in range(M)) for i in range(len(fusion.layers)))
        self.norms = nn.ModuleList(copy.deepcopy(layer.norm) for layer in fusion.layers)
        self.train(fusion.training)

    def forward(self, text, others, lengths: Optional[torch.Tensor] = None):
        L = text.shape[1]
        pad = _padding(lengths, L) if lengths is not None else None
        x = text
        for blocks, norm in zip(self.blocks, self.norms):
            x = norm(x + sum(blk(x, y, y, key_padding_mask=pad, need_weights=False)[0] for blk, y in zip(blocks, others)))
        if pad is not None:
            x = x * (~pad)[..., None]
        return x


def speaker_ids(speakers: Sequence[str]) -> list[int]:
    """Number the speakers of one dialogue by first appearance (0, 1, ...); from the
    MAX_SPEAKERS-th distinct speaker on, all share the last id. Names are matched exactly
    after stripping spaces; an empty name is an error."""
    ids: dict[str, int] = {}
    out = []
    for i, s in enumerate(speakers):
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"speakers: expected a non-empty speaker name for every utterance, got {s!r} at position {i}")
        key = s.strip()
        if key not in ids:
            ids[key] = min(len(ids), MAX_SPEAKERS - 1)
        out.append(ids[key])
    return out


def class_weights(counts: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """Inverse-frequency class weights ``(n / count) ** power``, normalised to mean 1 over
    the classes (power 0: plain cross-entropy; 1: fully balanced)."""
    counts = counts.double().clamp_min(1)
    w = (counts.sum() / counts) ** power
    return (w / w.mean()).float()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
               gamma: float = 0.0) -> torch.Tensor:
    """Mean class-weighted focal loss over rows (gamma 0: weighted cross-entropy)."""
    logp = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
    loss = -logp * (1 - logp.exp()) ** gamma if gamma else -logp
    if weight is not None:
        w = weight[target]
        return (loss * w).sum() / w.sum()
    return loss.mean()
