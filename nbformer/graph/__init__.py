from .ir import Graph, Node, Tensor  # noqa: F401
