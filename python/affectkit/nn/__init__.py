"""torch.nn modules built on affectkit's ops."""

__all__: list[str] = []

from .attention import CrossModalAttention, MultimodalFusion  # noqa: E402

__all__ += ["CrossModalAttention", "MultimodalFusion"]
