"""Attention layers on the fused cross_modal_attention op.

CrossModalAttention is a drop-in for ``torch.nn.MultiheadAttention(batch_first=True)``: same
constructor, call signature, parameter names (so it loads a MultiheadAttention state dict)
and outputs. MultimodalFusion is M2FNet's fusion stack, with every cross-modal attention of a
layer done by one op call.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.attention import cross_modal_attention


def _merge_masks(key_padding_mask, attn_mask, B, H, Lq, Lk, dtype):
    """MultiheadAttention's masks (True = do NOT attend, or additive) as one mask for the op
    (True = attend, or additive), broadcastable to (B, H, Lq, Lk); bool when both are bool."""
    masks = []
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Lk):
            raise ValueError(f"key_padding_mask: expected shape {(B, Lk)}, got {tuple(key_padding_mask.shape)}")
        masks.append(key_padding_mask[:, None, None, :])
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (Lq, Lk):
                raise ValueError(f"attn_mask: expected shape {(Lq, Lk)}, got {tuple(attn_mask.shape)}")
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (B * H, Lq, Lk):
                raise ValueError(f"attn_mask: expected shape {(B * H, Lq, Lk)}, got {tuple(attn_mask.shape)}")
            attn_mask = attn_mask.view(B, H, Lq, Lk)
        else:
            raise ValueError(f"attn_mask: expected a 2-D or 3-D tensor, got shape {tuple(attn_mask.shape)}")
        masks.append(attn_mask)
    if not masks:
        return None
    for m in masks:
        if m.dtype != torch.bool and not m.is_floating_point():
            raise TypeError(f"attn_mask, key_padding_mask: expected bool or floating masks, got {m.dtype}")
    if all(m.dtype == torch.bool for m in masks):
        allowed = ~masks[0]
        for m in masks[1:]:
            allowed = allowed & ~m
        return allowed
    total = None
    for m in masks:
        add = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)
        total = add if total is None else total + add
    return total


class CrossModalAttention(nn.Module):
    """``torch.nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, kdim=kdim, vdim=vdim,
    batch_first=True)`` on the fused op.

    Differences: a query row whose keys are all masked gives zeros (MultiheadAttention gives
    NaN); ``is_causal=True`` without ``attn_mask`` applies the bottom-right aligned causal
    mask (MultiheadAttention requires the mask); ``forward`` also accepts ``kv_lengths`` and
    ``q_lengths`` (B,) valid lengths, the fastest way to say key padding. ``add_bias_kv`` and
    ``add_zero_attn`` are not supported.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("batch_first: expected True (inputs are (batch, length, features)), got False")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim: expected a positive multiple of num_heads = {num_heads}, got {embed_dim}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.head_dim = embed_dim // num_heads
        self.batch_first = True
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:  # as MultiheadAttention
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def _project(self, query, key, value):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E : 2 * E], b[2 * E :])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one matmul
                return F.linear(query, w, b).chunk(3, dim=-1)
            q = F.linear(query, w[:E], bq)
            if key is value:
                k, v = F.linear(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1)
                return q, k, v
            return q, F.linear(key, w[E : 2 * E], bk), F.linear(value, w[2 * E :], bv)
        return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, kv_lengths: Optional[torch.Tensor] = None,
                q_lengths: Optional[torch.Tensor] = None):
        """query (B, Lq, E), key (B, Lk, kdim), value (B, Lk, vdim), or unbatched (L, features).

        Returns (attn_output (B, Lq, E), attn_weights): weights (B, Lq, Lk) averaged over heads,
        (B, H, Lq, Lk) when ``average_attn_weights=False``, None unless ``need_weights``.
        """
        batched = query.dim() == 3
        if not batched:
            if query.dim() != 2:
                raise ValueError(f"query: expected (B, L, E) or unbatched (L, E), got shape {tuple(query.shape)}")
            same_kv = key is value
            query, key = query.unsqueeze(0), key.unsqueeze(0)
            value = key if same_kv else value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != 3 or t.shape[-1] != width:
                raise ValueError(f"{name}: expected shape (B, L, {width}), got {tuple(t.shape)}")
        B, Lq, _ = query.shape
        Lk = key.shape[1]
        if value.shape[:2] != key.shape[:2] or query.shape[0] != key.shape[0]:
            raise ValueError(f"key, value: expected (B, Lk) = {(B, Lk)}, got {tuple(key.shape)} and {tuple(value.shape)}")
        H, hd = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        # (B, L, H, hd) -> (B, H, L, hd) views: the op reads these strides without a copy.
        q = q.view(B, Lq, H, hd).transpose(1, 2)
        k = k.view(B, Lk, H, hd).transpose(1, 2)
        v = v.view(B, Lk, H, hd).transpose(1, 2)
        mask = _merge_masks(key_padding_mask, attn_mask, B, H, Lq, Lk, q.dtype)
        causal = bool(is_causal) and attn_mask is None
        weights_mode = (True if average_attn_weights else "per_head") if need_weights else False
        result = cross_modal_attention(
            q, k, v, kv_lengths=kv_lengths, q_lengths=q_lengths, attn_mask=mask, causal=causal,
            dropout_p=self.dropout if self.training else 0.0, need_weights=weights_mode,
        )
        out, weights = result if need_weights else (result, None)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights


class MultimodalFusion(nn.Module):
    """M2FNet's multi-head attention fusion: the text stream queries every other modality.

    Each of ``num_layers`` layers computes ``x = LayerNorm(x + sum_m Attn_m(x, y_m, y_m))``
    where ``Attn_m`` is a MultiheadAttention-style block (its own q/k/v/out projections) and
    ``y_m`` the m-th other modality (e.g. audio, visual), all utterance-aligned with the text.
    The M attentions of a layer run as one fused op call over M * num_heads heads, with one
    query projection and one output projection for all of them.

    Args:
        embed_dim: text feature width; num_heads: heads per modality attention.
        modality_dims: feature widths of the other modalities (default: two of embed_dim).
        num_layers: fusion layers; dropout: attention dropout in training.
    """

    def __init__(self, embed_dim: int, num_heads: int, modality_dims: Sequence[int] = (), num_layers: int = 1,
                 dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim: expected a positive multiple of num_heads = {num_heads}, got {embed_dim}")
        if num_layers < 1:
            raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
        dims = list(modality_dims) or [embed_dim, embed_dim]
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.modality_dims, self.dropout = embed_dim, num_heads, dims, dropout
        M, E = len(dims), embed_dim
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            layer = nn.Module()
            # Stacked per modality m: rows [m*E, (m+1)*E) of q_proj / k_proj / v_proj belong to
            # modality m; out_proj's columns [m*E, (m+1)*E) too (its output is summed over m).
            layer.q_proj = nn.Linear(E, M * E, **factory)
            layer.k_projs = nn.ModuleList(nn.Linear(d, E, **factory) for d in dims)
            layer.v_projs = nn.ModuleList(nn.Linear(d, E, **factory) for d in dims)
            layer.out_proj = nn.Linear(M * E, E, **factory)
            layer.norm = nn.LayerNorm(E, **factory)
            self.layers.append(layer)

    def forward(self, text: torch.Tensor, others: Sequence[torch.Tensor],
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text (B, L, E); others: one (B, L, d_m) tensor per modality, utterance-aligned;
        lengths (B,) valid utterances per dialogue (padding ignored; padded rows of the
        output are zeros). Returns (B, L, E)."""
        if text.dim() != 3 or text.shape[-1] != self.embed_dim:
            raise ValueError(f"text: expected shape (B, L, {self.embed_dim}), got {tuple(text.shape)}")
        if len(others) != len(self.modality_dims):
            raise ValueError(f"others: expected {len(self.modality_dims)} modality tensors, got {len(others)}")
        B, L, E = text.shape
        for m, (y, d) in enumerate(zip(others, self.modality_dims)):
            if y.shape != (B, L, d):
                raise ValueError(f"others[{m}]: expected shape {(B, L, d)} (aligned with text), got {tuple(y.shape)}")
        M, H, hd = len(others), self.num_heads, self.embed_dim // self.num_heads
        x = text
        for layer in self.layers:
            q = layer.q_proj(x).view(B, L, M * H, hd).transpose(1, 2)
            k = torch.cat([proj(y) for proj, y in zip(layer.k_projs, others)], -1).view(B, L, M * H, hd).transpose(1, 2)
            v = torch.cat([proj(y) for proj, y in zip(layer.v_projs, others)], -1).view(B, L, M * H, hd).transpose(1, 2)
            att = cross_modal_attention(q, k, v, kv_lengths=lengths, q_lengths=lengths,
                                        dropout_p=self.dropout if self.training else 0.0)
            x = layer.norm(x + layer.out_proj(att.transpose(1, 2).reshape(B, L, M * E)))
        if lengths is not None:
            valid = torch.arange(L, device=x.device)[None, :, None] < lengths.to(x.device)[:, None, None]
            x = x * valid
        return x

    def attention_block(self, layer_index: int, modality: int) -> CrossModalAttention:
        """The (layer, modality) attention as a standalone CrossModalAttention sharing no storage
        (copies of the weights); with ``load_state_dict`` from it, the inverse direction."""
        layer, E = self.layers[layer_index], self.embed_dim
        d = self.modality_dims[modality]
        block = CrossModalAttention(E, self.num_heads, dropout=self.dropout, kdim=d, vdim=d,
                                    device=layer.q_proj.weight.device, dtype=layer.q_proj.weight.dtype)
        rows = slice(modality * E, (modality + 1) * E)
        with torch.no_grad():
            if block._qkv_same_embed_dim:
                block.in_proj_weight.copy_(torch.cat([layer.q_proj.weight[rows], layer.k_projs[modality].weight,
                                                      layer.v_projs[modality].weight]))
            else:
                block.q_proj_weight.copy_(layer.q_proj.weight[rows])
                block.k_proj_weight.copy_(layer.k_projs[modality].weight)
                block.v_proj_weight.copy_(layer.v_projs[modality].weight)
            block.in_proj_bias.copy_(torch.cat([layer.q_proj.bias[rows], layer.k_projs[modality].bias,
                                                layer.v_projs[modality].bias]))
            block.out_proj.weight.copy_(layer.out_proj.weight[:, rows])
            block.out_proj.bias.copy_(layer.out_proj.bias / len(self.modality_dims))
        return block
