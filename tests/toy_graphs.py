"""Toy domains for what time series does not exercise, through the same code paths as real domains.

- `ToyGraphDomain`: graphs with two variable-size levels, nodes (a categorical type each) and the
  unordered node pairs {i < j} (a categorical edge type each: none or bond), linked by `edge_index`;
  a categorical condition (`family`: chain or ring) and a continuous one (`density`, the fraction of
  pairs bonded); per-partition statistics (nodes per graph) that templates draw sizes from; node
  types can be given (as atom types are in crystal structure prediction).
- `LatentVectorDomain`: vectors in R^4 near a plane (a `VectorDomain`), diffused as 2-d latents of a
  linear codec.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pyarrow as pa
import torch
from torch import nn

from archipelago.experts.batch import FieldSpec, Layout
from archipelago.experts.conditions import Condition
from archipelago.experts.data import LevelSamples
from archipelago.experts.domain import Domain
from archipelago.experts.paths import GaussianPath, MaskedPath
from tests.toy_domains import VectorDomain, VectorNet

NODE_TYPES, EDGE_TYPES = 2, 2  # node types a/b; edge types none/bond
FAMILIES = ("chain", "ring")


def pairs(n: int) -> np.ndarray:
    """The unordered node pairs {i < j} of an n-node graph, [n (n - 1) / 2, 2]."""
    i, j = np.triu_indices(n, k=1)
    return np.stack([i, j], 1)


def _record(graph: nx.Graph) -> dict:
    """A decoded graph as a record: its node types, edges in `pairs` order, family and density."""
    n = graph.number_of_nodes()
    edges = [int(graph.has_edge(int(i), int(j))) for i, j in pairs(n)]
    family = "ring" if n > 2 and nx.cycle_basis(graph) else "chain"
    return {"node_type": [graph.nodes[i]["type"] for i in range(n)], "edge_type": edges, "family": family,
            "density": sum(edges) / max(len(edges), 1)}


def toy_graphs(count: int, seed: int = 0) -> list[dict]:
    """Chains and rings: small ones of 3-4 nodes and large ones of 6-7, node types alternating."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.choice([3, 4, 6, 7]))
        family = FAMILIES[int(rng.integers(2))]
        bonds = {(i, i + 1) for i in range(n - 1)} | ({(0, n - 1)} if family == "ring" else set())
        edges = [int((int(i), int(j)) in bonds) for i, j in pairs(n)]
        types = [(i + int(rng.integers(2))) % NODE_TYPES for i in range(n)]
        out.append({"node_type": types, "edge_type": edges, "family": family, "density": sum(edges) / len(edges)})
    return out


class ToyGraphNet(nn.Module):
    """Two rounds of messages over the pair level; per-node, per-pair (symmetric) or per-graph outputs."""

    def __init__(self, outputs: int | None = None, width: int = 32):
        super().__init__()
        self.node = nn.Embedding(NODE_TYPES + 1, width)  # + the mask token
        self.edge = nn.Embedding(EDGE_TYPES + 1, width)
        self.family = nn.Embedding(len(FAMILIES) + 1, width)  # + null
        self.density = nn.Linear(2, width)  # (value, present)
        self.time = nn.Linear(1, width)
        self.message = nn.ModuleList([nn.Sequential(nn.Linear(3 * width, width), nn.SiLU()) for _ in range(2)])
        self.node_head = nn.Linear(width, NODE_TYPES)
        self.edge_head = nn.Sequential(nn.Linear(3 * width, width), nn.SiLU(), nn.Linear(width, EDGE_TYPES))
        self.graph_head = nn.Linear(width, outputs) if outputs else None

    def forward(self, x_t, t):
        nodes, b = x_t["node_batch"], len(t)
        density = x_t["density"].float()
        context = (self.time(t[:, None].float()) + self.family(x_t["family"])
                   + self.density(torch.stack([density.nan_to_num(0.0), (~density.isnan()).float()], 1)))
        h = self.node(x_t["node_type"]) + context[nodes]  # [N, W]
        i, j = x_t["edge_index"][:, 0], x_t["edge_index"][:, 1]  # [E] rows of the batch's nodes
        e = self.edge(x_t["edge_type"])  # [E, W]
        degree = torch.bincount(torch.cat([i, j]), minlength=len(h)).clamp_min(1)[:, None]
        for layer in self.message:
            to_i, to_j = layer(torch.cat([h[j], e, h[i] * h[j]], 1)), layer(torch.cat([h[i], e, h[i] * h[j]], 1))
            h = h + (torch.zeros_like(h).index_add_(0, i, to_i).index_add_(0, j, to_j)) / degree
        if self.graph_head is not None:
            pooled = torch.zeros(b, h.shape[1]).index_add_(0, nodes, h)
            return self.graph_head(pooled / torch.bincount(nodes, minlength=b).clamp_min(1)[:, None])
        pair = torch.cat([h[i] + h[j], h[i] * h[j], e], 1)  # symmetric in (i, j)
        return {"node_type": self.node_head(h), "edge_type": self.edge_head(pair)}


class ToyGraphDomain(Domain):
    name = "toygraphs"

    @property
    def fields(self):
        return {"edge_type": FieldSpec(MaskedPath(EDGE_TYPES), index="edge_batch"),
                "node_type": FieldSpec(MaskedPath(NODE_TYPES), index="node_batch")}

    @property
    def layout(self):
        return Layout.of(self.fields, rows={"edge_index": "edge_batch"}, links={"edge_index": "node_batch"})

    @property
    def conditions(self):
        return {"density": Condition("density", units="bonded fraction of node pairs"),
                "family": Condition("family", classes=FAMILIES)}

    def ingest(self, source, fit=True):
        return pa.Table.from_pylist([_record(item) if isinstance(item, nx.Graph) else item for item in source])

    def samples(self, table):
        rows = table.to_pylist()
        sizes = torch.tensor([len(r["node_type"]) for r in rows])
        edges = [torch.from_numpy(pairs(len(r["node_type"]))) for r in rows]
        nodes = {"node_type": torch.tensor([v for r in rows for v in r["node_type"]])}
        pair_level = {"edge_type": torch.tensor([v for r in rows for v in r["edge_type"]]),
                      "edge_index": torch.cat(edges).long()}
        dense = {"family": torch.tensor([FAMILIES.index(r["family"]) for r in rows]),
                 "density": torch.tensor([r["density"] for r in rows], dtype=torch.float32)}
        return LevelSamples({"node_batch": (nodes, sizes), "edge_batch": (pair_level, torch.tensor(
            [len(e) for e in edges]))}, dense=dense, links={"edge_index": "node_batch"})

    def features(self, table):
        return np.array([[len(r["node_type"]), r["density"]] for r in table.to_pylist()], dtype=float)

    def statistics(self, table):
        counts = np.bincount([len(types) for types in table.column("node_type").to_pylist()])
        return {"nodes": counts.astype(float).tolist()}

    def denoiser_network(self):
        return ToyGraphNet()

    def router_network(self, num_experts):
        return ToyGraphNet(num_experts)

    def template(self, n, generator=None, statistics=None, given=None):
        if given and "node_type" in given:
            lists = given["node_type"]
            if len(lists) != n or not all(isinstance(types, (list, tuple)) for types in lists):
                raise ValueError(f"given field 'node_type' needs one list of node types per graph ({n} graphs)")
            sizes = torch.tensor([len(types) for types in given["node_type"]])
        else:
            counts = torch.tensor((statistics or {}).get("nodes") or [0, 0, 0, 1], dtype=torch.float64)
            sizes = torch.multinomial(counts, n, replacement=True, generator=generator)
        edges = [torch.from_numpy(pairs(int(size))).long() for size in sizes]
        starts = torch.cumsum(sizes, 0) - sizes
        return {"node_type": torch.zeros(int(sizes.sum()), dtype=torch.long),
                "node_batch": torch.repeat_interleave(torch.arange(n), sizes),
                "edge_type": torch.zeros(sum(len(e) for e in edges), dtype=torch.long),
                "edge_index": torch.cat([e + s for e, s in zip(edges, starts, strict=True)]),
                "edge_batch": torch.repeat_interleave(torch.arange(n), torch.tensor([len(e) for e in edges]))}

    def given_values(self, given, template):
        if set(given) - {"node_type"}:
            raise ValueError(f"only node_type can be given, not {sorted(set(given) - {'node_type'})}")
        if not given:
            return {}
        return {"node_type": torch.tensor([v for types in given["node_type"] for v in types])}

    def decode(self, batch):
        graphs = []
        for g in range(int(batch["node_batch"].max()) + 1):
            nodes = torch.nonzero(batch["node_batch"] == g).squeeze(1)
            graph = nx.Graph()
            graph.add_nodes_from((i, {"type": int(batch["node_type"][row])}) for i, row in enumerate(nodes.tolist()))
            mine = torch.nonzero((batch["edge_batch"] == g) & (batch["edge_type"] == 1)).squeeze(1)
            first = int(nodes[0])
            graph.add_edges_from((int(i) - first, int(j) - first) for i, j in batch["edge_index"][mine].tolist())
            graphs.append(graph)
        return graphs

    def evaluate(self, real, generated, **options):
        graphs = self.decode(generated)
        return {"connected": float(np.mean([nx.is_connected(g) for g in graphs])),
                "mean_nodes": float(np.mean([g.number_of_nodes() for g in graphs]))}

    def to_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class LinearCodec(nn.Module):
    """x [B, dim] <-> z [B, 2]: a linear autoencoder (a learned PCA) trained on reconstruction error."""

    inputs = ("x",)

    def __init__(self, dim: int = 4):
        super().__init__()
        self.down, self.up = nn.Linear(dim, 2), nn.Linear(2, dim)

    def encode(self, batch):
        return {"z": self.down(batch["x"])}

    def decode(self, latents):
        return {"x": self.up(latents["z"])}

    def loss(self, batch, generator=None):
        return ((self.decode(self.encode(batch))["x"] - batch["x"]) ** 2).mean()


class LatentVectorDomain(VectorDomain):
    """Records, features, decoding and metrics of `VectorDomain` in R^dim; the diffused field is z."""

    name = "latentvectors"

    def __init__(self, dim: int = 4):
        super().__init__(dim)

    @property
    def fields(self):
        return {"z": FieldSpec(GaussianPath())}

    def denoiser_network(self):
        return VectorNet(2, 2, key="z", field="z")

    def router_network(self, num_experts):
        return VectorNet(2, num_experts, key=None, field="z")

    def codec_network(self):
        return LinearCodec(self.dim)

    def template(self, n, generator=None, statistics=None, given=None):
        return {"z": torch.zeros(n, 2)}


def plane_vectors(count: int, seed: int = 0) -> np.ndarray:
    """Two clusters on a plane in R^4 (plus a little noise off it)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((count, 2)) * 0.3 + np.where(rng.random((count, 1)) < 0.5, -1.5, 1.5)
    basis = np.array([[1.0, 0.5, 0.0, -0.5], [0.0, 1.0, 1.0, 0.5]])
    return (z @ basis + 0.02 * rng.standard_normal((count, 4))).astype(np.float32)
