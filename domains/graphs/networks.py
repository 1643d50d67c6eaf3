"""Networks of the graph domain: a DiGress-style graph transformer and its pooled router backbone.

A batch holds graphs as two ragged levels (nodes; unordered node pairs {i < j}, each with an edge
category, linked to the nodes by `pair_index`), each graph's rows contiguous and in graph order, as
in PyG's batches. The networks lay them out dense with
torch-geometric's `to_dense_batch` and `to_dense_adj`: node features X [B, n, dx], pair features
E [B, n, n, de] (symmetric) and graph features y [B, dy], with a node mask [B, n].

The layer follows the graph transformer of DiGress (Vignac et al. 2023, "DiGress: Discrete Denoising
diffusion for graph generation", Sec. 4 and App. B): attention scores Q_i . K_j (per head; DiGress
scores per channel) are modulated by the pair features (E-FiLM), become the new pair features, and
weight the values after a masked softmax; the graph features y, which carry the diffusion time and
the conditions, modulate nodes and pairs (y-FiLM) and are updated from pooled nodes and pairs.

Structural input features are computed from the noisy graph x_t as DiGress does, since a transformer
over single pairs cannot count cycles or see connectivity on its own: triangles and 4-cycles through
every node and in the whole graph (closed-walk formulas on the adjacency), and spectral features of
the graph Laplacian (the number of connected components, the smallest non-zero eigenvalues, the two
first non-trivial eigenvectors, and membership of the largest component). Only revealed edges count:
a masked pair is not an edge of x_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.utils import to_dense_adj, to_dense_batch

from archipelago.experts.conditions import Condition
from archipelago.experts.embeddings import ConditionEmbedding, RevealEmbedding, TimestepEmbedder

EIGENVALUES = 5  # smallest non-zero Laplacian eigenvalues in the graph features
EIGENVECTORS = 2  # first non-trivial eigenvectors in the node features
NODE_STRUCTURE = 2 + EIGENVECTORS + 1  # triangles, 4-cycles, eigenvectors, largest-component flag
GRAPH_STRUCTURE = 4 + EIGENVALUES  # size, components, triangles, 4-cycles, eigenvalues


@dataclass(frozen=True)
class GraphNetConfig:
    node_categories: int  # classes of node labels (0: the graphs have no node labels)
    edge_categories: int  # classes of a pair: 0 is "no edge", then the edge labels
    max_nodes: int  # n, the largest graph (normalises the size feature)
    conditions: tuple[Condition, ...] = ()  # graph-level conditions, sorted by name
    width: int = 64  # dx, node channels (and dy, graph channels)
    edge_width: int = 16  # de, pair channels
    depth: int = 4  # transformer layers
    heads: int = 4  # attention heads; must divide width
    outputs: int | None = None  # None: a denoiser; K: a router with K logits
    reveal_noise: bool = False  # the denoiser reads masked entries' reveal noise (a few-step student)

    def __post_init__(self) -> None:
        if min(self.width, self.edge_width, self.depth, self.heads, self.max_nodes) < 1:
            raise ValueError("width, edge_width, depth, heads and max_nodes must all be >= 1")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")


@dataclass(frozen=True)
class Dense:
    """A ragged graph batch laid out dense: where each node and pair row sits."""

    node_mask: Tensor  # [B, n] real nodes
    local: Tensor  # [N] each node row's position within its graph
    pairs: Tensor  # [P, 3] (graph, i, j) of each pair row, i < j
    adjacency: Tensor  # [B, n, n] revealed edges of x_t (float, symmetric)


def lay_out(x_t: dict[str, Tensor], b: int, edge_categories: int) -> Dense:
    """Positions of the nodes and pairs of a ragged batch in the dense layout, and x_t's adjacency."""
    nodes = x_t["node_batch"]
    counts = torch.bincount(nodes, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(len(nodes), device=nodes.device) - starts[nodes]
    n = max(int(counts.max()), 1) if len(nodes) else 1
    node_mask = torch.arange(n, device=nodes.device) < counts[:, None]  # [B, n], as to_dense_batch pads
    i, j = x_t["pair_index"][:, 0], x_t["pair_index"][:, 1]
    pairs = torch.stack([nodes[i], local[i], local[j]], 1)
    edge = x_t["edge_type"]
    is_edge = ((edge > 0) & (edge < edge_categories)).float()  # "no edge" and the mask are not edges
    adjacency = symmetric_dense(is_edge[:, None], x_t, nodes, b, n)[..., 0]
    return Dense(node_mask, local, pairs, adjacency)


def symmetric_dense(values: Tensor, x_t: dict[str, Tensor], nodes: Tensor, b: int, n: int) -> Tensor:
    """Per-pair values [P, C] as a symmetric dense tensor [B, n, n, C] (zero on the diagonal and padding)."""
    i, j = x_t["pair_index"][:, 0], x_t["pair_index"][:, 1]
    both = torch.stack([torch.cat([i, j]), torch.cat([j, i])])
    return to_dense_adj(both, nodes, torch.cat([values, values]), max_num_nodes=n, batch_size=b)


def cycle_features(adjacency: Tensor) -> tuple[Tensor, Tensor]:
    """Triangles and 4-cycles through each node [B, n, 2] and in each graph [B, 2], from closed walks:
    a node's closed 3-walks are twice its triangles; its closed 4-walks are d^2 + sum_j A_ij (d_j - 1)
    backtracking walks plus twice its 4-cycles."""
    a2 = adjacency @ adjacency
    degree = adjacency.sum(-1)  # [B, n]
    triangles = (a2 @ adjacency).diagonal(dim1=-2, dim2=-1) / 2
    walks4 = (a2 @ a2).diagonal(dim1=-2, dim2=-1)
    backtracking = degree**2 + (adjacency @ (degree - 1).clamp_min(0)[..., None])[..., 0]
    squares = ((walks4 - backtracking) / 2).clamp_min(0)
    node = torch.stack([triangles, squares], -1)  # [B, n, 2]
    graph = torch.stack([triangles.sum(-1) / 3, squares.sum(-1) / 4], -1)  # each cycle counted at its nodes
    return node, graph


def spectral_features(adjacency: Tensor, node_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Laplacian features: per node [B, n, EIGENVECTORS + 1] (first non-trivial eigenvectors, in the
    largest component), per graph [B, 1 + EIGENVALUES] (components, smallest non-zero eigenvalues)."""
    b, n = node_mask.shape
    laplacian = torch.diag_embed(adjacency.sum(-1)) - adjacency
    # Padding nodes get a large diagonal entry so that their eigenvalues sit above every real one.
    laplacian = laplacian + torch.diag_embed(2.0 * n * (~node_mask).float())
    values, vectors = torch.linalg.eigh(laplacian.double())
    values, vectors = values.float(), vectors.float()
    zero = values < 1e-5
    components = zero.sum(-1)  # [B]
    sizes = node_mask.sum(-1, keepdim=True)
    first = components[:, None] + torch.arange(EIGENVALUES, device=values.device)  # first non-zero eigenvalues
    nonzero = values.gather(1, first.clamp_max(n - 1)) * (first < sizes)  # zero past a small graph's spectrum
    pick = components[:, None] + torch.arange(EIGENVECTORS, device=values.device)  # [B, EIGENVECTORS]
    eigvecs = vectors.gather(2, pick.clamp_max(n - 1)[:, None, :].expand(b, n, EIGENVECTORS))
    eigvecs = eigvecs * (pick < sizes)[:, None, :]
    # The kernel's eigenvectors are indicators of components: the largest component is the
    # one whose indicator has the most non-zero entries.
    kernel = vectors * zero[:, None, :]
    support = (kernel.abs() > 1e-6).float()
    largest = support.sum(1).argmax(-1)  # [B]
    in_largest = support.gather(2, largest[:, None, None].expand(b, n, 1))
    node = torch.cat([eigvecs, in_largest], -1) * node_mask[..., None]
    graph = torch.cat([components[:, None].float(), nonzero], -1)
    return node, graph


class GraphTransformerLayer(nn.Module):
    """One DiGress layer: E-modulated attention (per head) over nodes, pairs updated from the scores,
    y-FiLM on both, y updated from pooled nodes and pairs; residuals and post-norms as in DiGress."""

    def __init__(self, dx: int, de: int, dy: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dx, dx), nn.Linear(dx, dx), nn.Linear(dx, dx)
        self.e_mul, self.e_add = nn.Linear(de, heads), nn.Linear(de, heads)
        self.y_e, self.y_x = nn.Linear(dy, 2 * heads), nn.Linear(dy, 2 * dx)
        self.x_out, self.e_out = nn.Linear(dx, dx), nn.Linear(heads, de)
        self.y_from = nn.Sequential(nn.Linear(dy + 2 * dx + 2 * de, dy), nn.SiLU(), nn.Linear(dy, dy))
        self.norm_x, self.norm_e, self.norm_y = nn.LayerNorm(dx), nn.LayerNorm(de), nn.LayerNorm(dy)
        self.ff_x = nn.Sequential(nn.Linear(dx, 2 * dx), nn.SiLU(), nn.Linear(2 * dx, dx))
        self.ff_e = nn.Sequential(nn.Linear(de, 2 * de), nn.SiLU(), nn.Linear(2 * de, de))
        self.norm_x2, self.norm_e2 = nn.LayerNorm(dx), nn.LayerNorm(de)

    def forward(self, x: Tensor, e: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, dx = x.shape
        h, dk = self.heads, dx // self.heads
        pair_mask = (mask[:, :, None] & mask[:, None, :])[..., None]  # [B, n, n, 1]
        q, k, v = (proj(x).reshape(b, n, h, dk) for proj in (self.q, self.k, self.v))  # [B, n, h, dk]
        # Scores per head, not per channel as in DiGress: the [B, n, n, dx] tensors of per-channel
        # scores cost dk times the memory and time, which a CPU cannot afford at 64 nodes.
        scores = torch.einsum("bihd,bjhd->bijh", q, k) / math.sqrt(dk)  # [B, n, n, h]
        scores = scores * (1 + self.e_mul(e)) + self.e_add(e)  # E-FiLM
        add_e, mul_e = self.y_e(y)[:, None, None].chunk(2, -1)
        new_e = self.e_out(add_e + (1 + mul_e) * scores) * pair_mask  # [B, n, n, de]
        weights = scores.masked_fill(~mask[:, None, :, None], float("-inf")).softmax(dim=2)  # over j
        weights = weights.nan_to_num(0.0)  # rows of padding nodes have no j
        attended = torch.einsum("bijh,bjhd->bihd", weights, v).reshape(b, n, dx)
        add_x, mul_x = self.y_x(y)[:, None].chunk(2, -1)
        new_x = self.x_out(add_x + (1 + mul_x) * attended) * mask[..., None]
        flat_mask = pair_mask.flatten(1, 2)[..., 0]
        pooled = torch.cat([y, masked_mean(x, mask), masked_max(x, mask), masked_mean(e.flatten(1, 2), flat_mask),
                            masked_max(e.flatten(1, 2), flat_mask)], -1)
        y = self.norm_y(y + self.y_from(pooled))
        x = self.norm_x(x + new_x)
        x = self.norm_x2(x + self.ff_x(x)) * mask[..., None]
        e = self.norm_e(e + new_e)
        e = self.norm_e2(e + self.ff_e(e)) * pair_mask
        return x, e, y


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 1 of [B, M, C] where mask [B, M] holds: [B, C]."""
    return (values * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """Max over dim 1 of [B, M, C] where mask [B, M] holds (zero for an empty graph): [B, C]."""
    return values.masked_fill(~mask[..., None], float("-inf")).amax(1).nan_to_num(0.0, neginf=0.0)


class GraphTransformer(nn.Module):
    """The denoiser (per-node and per-pair logits over clean categories) or, with `outputs`, the router
    (logits of p(k | x_t, t) from pooled nodes and the graph features)."""

    def __init__(self, config: GraphNetConfig):
        super().__init__()
        c = self.config = config
        dx, de = c.width, c.edge_width
        node_in = (c.node_categories + 1 if c.node_categories else 1) + NODE_STRUCTURE
        self.embed_x = nn.Sequential(nn.Linear(node_in, dx), nn.SiLU(), nn.Linear(dx, dx))
        self.embed_e = nn.Sequential(nn.Linear(c.edge_categories + 1, de), nn.SiLU(), nn.Linear(de, de))
        self.embed_y = nn.Sequential(nn.Linear(GRAPH_STRUCTURE + 1, dx), nn.SiLU(), nn.Linear(dx, dx))
        # 64 frequencies over periods up to 1000 (of t scaled by 1000): the whole of t in [0, 1]
        self.time = TimestepEmbedder(dx, frequency_dim=128, max_period=1000.0)
        self.condition = ConditionEmbedding(c.conditions, dx)
        self.layers = nn.ModuleList(GraphTransformerLayer(dx, de, dx, c.heads) for _ in range(c.depth))
        self.reveal_x = RevealEmbedding(dx) if c.reveal_noise and c.node_categories else None
        self.reveal_e = RevealEmbedding(de) if c.reveal_noise else None
        if c.outputs is None:
            self.node_head = nn.Linear(dx, c.node_categories) if c.node_categories else None
            self.edge_head = nn.Sequential(nn.Linear(de, de), nn.SiLU(), nn.Linear(de, c.edge_categories))
        else:
            self.router_head = nn.Sequential(nn.Linear(3 * dx, dx), nn.SiLU(), nn.Linear(dx, c.outputs))

    def forward(self, x_t: dict[str, Tensor], t: Tensor) -> dict[str, Tensor] | Tensor:
        c, b = self.config, len(t)
        dense = lay_out(x_t, b, c.edge_categories)
        mask = dense.node_mask
        x, e, y = self.inputs(x_t, t, dense)
        for layer in self.layers:
            x, e, y = layer(x, e, y, mask)
        if c.outputs is not None:
            return self.router_head(torch.cat([masked_mean(x, mask), masked_max(x, mask), y], -1))  # [B, K]
        e = (e + e.transpose(1, 2)) / 2  # a pair's output does not depend on the order of its nodes
        g, i, j = dense.pairs.unbind(1)
        out = {"edge_type": self.edge_head(e[g, i, j])}  # [P, edge_categories]
        if self.node_head is not None:
            out["node_type"] = self.node_head(x[x_t["node_batch"], dense.local])  # [N, node_categories]
        return out

    def inputs(self, x_t: dict[str, Tensor], t: Tensor, dense: Dense) -> tuple[Tensor, Tensor, Tensor]:
        """X [B, n, dx], E [B, n, n, de] and y [B, dx] from x_t's categories and structure, t and conditions."""
        c, b = self.config, len(t)
        mask, n, nodes = dense.node_mask, dense.node_mask.shape[1], x_t["node_batch"]
        with torch.no_grad():
            node_cycles, graph_cycles = cycle_features(dense.adjacency)
            node_spectral, graph_spectral = spectral_features(dense.adjacency, mask)
        if c.node_categories:
            types = nn.functional.one_hot(x_t["node_type"], c.node_categories + 1).float()
            types, _ = to_dense_batch(types, nodes, batch_size=b, max_num_nodes=n)
        else:
            types = mask[..., None].float()
        x = self.embed_x(torch.cat([types, node_cycles / 10, node_spectral], -1))
        pair_onehot = nn.functional.one_hot(x_t["edge_type"], c.edge_categories + 1).float()
        e = self.embed_e(symmetric_dense(pair_onehot, x_t, nodes, b, n))
        node_reveal = self.reveal_x(x_t, "node_type", c.node_categories) if self.reveal_x else None
        if node_reveal is not None:
            x = x + to_dense_batch(node_reveal, nodes, batch_size=b, max_num_nodes=n)[0]
        pair_reveal = self.reveal_e(x_t, "edge_type", c.edge_categories) if self.reveal_e else None
        if pair_reveal is not None:
            e = e + symmetric_dense(pair_reveal, x_t, nodes, b, n)
        x = x * mask[..., None]
        e = e * (mask[:, :, None] & mask[:, None, :])[..., None]
        size = mask.sum(-1, keepdim=True).float() / c.max_nodes
        masked = (x_t["edge_type"] == c.edge_categories).float()
        masked_share = torch.zeros(b, device=t.device).index_add_(0, dense.pairs[:, 0], masked)
        masked_share = masked_share / torch.bincount(dense.pairs[:, 0], minlength=b).clamp_min(1)
        graph = torch.cat([size, graph_spectral[:, :1], graph_cycles / 10, graph_spectral[:, 1:],
                           masked_share[:, None]], -1)
        y = self.embed_y(graph) + self.time(t) + self.condition(x_t, b, t.device)
        return x, e, y
