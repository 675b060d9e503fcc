"""torch.nn modules built on affectkit's ops."""

__all__: list[str] = []
