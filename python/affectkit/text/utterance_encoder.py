"""A sentence encoder whose top layers can be fine-tuned, running them on affectkit's attention.

The bottom of the base model (a BERT-style sentence-transformers model, all-MiniLM-L6-v2 by
default) stays frozen; its token states are computed once per text (and can be kept in memory
for training). The top ``tuned_layers`` layers are affectkit modules initialised from the base
model's weights, with their self-attention on the fused ``cross_modal_attention`` op reading the
real token count of each text (no attention over padding). Mean pooling over real tokens gives
the utterance vector, as the base model's own pooling does. Only the tuned layers are trainable
and saved, so a fine-tuned encoder ships in a few MB and the base comes from its package.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.attention import cross_modal_attention
from .encoder import DEFAULT_MODEL, _load_sentence_transformer

# HF BertLayer parameter names -> ours.
_HF_NAMES = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "out_norm",
}


class EncoderLayer(nn.Module):
    """BERT's post-LayerNorm encoder layer (erf GELU) with its attention on the fused op
    (``attention = "torch"`` runs it on torch's scaled_dot_product_attention instead)."""

    attention = "fused"

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, eps: float = 1e-12, dropout: float = 0.1) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model: expected a multiple of num_heads = {num_heads}, got {d_model}")
        self.num_heads, self.dropout = num_heads, dropout
        self.query, self.key, self.value = (nn.Linear(d_model, d_model) for _ in range(3))
        self.attn_out, self.attn_norm = nn.Linear(d_model, d_model), nn.LayerNorm(d_model, eps=eps)
        self.ffn_in, self.ffn_out = nn.Linear(d_model, ffn_dim), nn.Linear(ffn_dim, d_model)
        self.out_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.num_heads

        def heads(t):
            return t.view(B, T, H, D // H).transpose(1, 2)

        p = self.dropout if self.training else 0.0
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if self.attention == "fused":
            a = cross_modal_attention(q, k, v, kv_lengths=lengths, q_lengths=lengths, dropout_p=p)
        else:
            keep = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[:, None, None, :]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        h = self.attn_norm(x + F.dropout(self.attn_out(a.transpose(1, 2).reshape(B, T, D)), p, self.training))
        return self.out_norm(h + F.dropout(self.ffn_out(F.gelu(self.ffn_in(h))), p, self.training))

    def load_hf_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a HF BertLayer state dict (names as in BertModel.encoder.layer[i])."""
        ours = {}
        for name, value in state.items():
            prefix, leaf = name.rsplit(".", 1)
            if prefix not in _HF_NAMES:
                raise ValueError(f"state: unexpected BERT layer parameter {name!r}")
            ours[f"{_HF_NAMES[prefix]}.{leaf}"] = value
        self.load_state_dict(ours)


class UtteranceEncoder(nn.Module):
    """texts -> (n, d) mean-pooled utterance vectors; the top ``tuned_layers`` are trainable.

    ``frozen_states(texts)`` runs the frozen bottom once (no gradient) and returns each text's
    token states; ``pool(states)`` runs the tuned layers and pools. ``forward(texts)`` does
    both. With untouched weights the result equals the base model's unnormalised embedding.
    """

    def __init__(self, base: str = DEFAULT_MODEL, tuned_layers: int = 2, *, dropout: float = 0.1,
                 batch_size: int = 64) -> None:
        super().__init__()
        st = _load_sentence_transformer(base, "cpu")
        bert = st[0].auto_model
        layers = bert.encoder.layer
        if not 0 <= tuned_layers <= len(layers):
            raise ValueError(f"tuned_layers: expected 0..{len(layers)} for {base!r}, got {tuned_layers}")
        cfg = bert.config
        if getattr(cfg, "hidden_act", "gelu") != "gelu":
            raise ValueError(f"base: expected a BERT-style model with erf GELU, got hidden_act={cfg.hidden_act!r}")
        self.base, self.tuned_layers, self.batch_size = base, tuned_layers, batch_size
        self.dim = cfg.hidden_size
        self.layers = nn.ModuleList()
        for hf_layer in layers[len(layers) - tuned_layers:]:
            layer = EncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps, dropout)
            layer.load_hf_state(hf_layer.state_dict())
            self.layers.append(layer)
        # The frozen part is kept out of the module tree: it is neither trained nor saved.
        bert.encoder.layer = nn.ModuleList(layers[: len(layers) - tuned_layers])
        bert.eval().requires_grad_(False)
        self._frozen = (st.tokenizer, bert, st.max_seq_length)

    @torch.no_grad()
    def frozen_states(self, texts: list[str]) -> list[torch.Tensor]:
        """Token states after the frozen layers, one (tokens, d) float32 tensor per text."""
        tokenizer, bert, max_len = self._frozen
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        out: list[torch.Tensor | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            hidden = bert(**enc).last_hidden_state
            for row, i in enumerate(idx):
                out[i] = hidden[row, : int(enc["attention_mask"][row].sum())].clone()
        return out  # type: ignore[return-value]

    def pool(self, states: list[torch.Tensor], *, chunk: int = 32) -> torch.Tensor:
        """Tuned layers then the mean over each text's tokens: (n, d). Texts of similar length
        run together (chunks of `chunk`), so padding costs almost nothing."""
        if not states:
            return torch.zeros(0, self.dim)
        order = sorted(range(len(states)), key=lambda i: states[i].shape[0])
        pooled = []
        for start in range(0, len(order), chunk):
            part = [states[i] for i in order[start:start + chunk]]
            lengths = torch.tensor([s.shape[0] for s in part])
            x = nn.utils.rnn.pad_sequence(part, batch_first=True)
            for layer in self.layers:
                x = layer(x, lengths)
            valid = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(x.dtype)[..., None]
            pooled.append((x * valid).sum(1) / lengths[:, None].to(x.dtype))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(pooled)[inverse]

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.pool(self.frozen_states(texts))

