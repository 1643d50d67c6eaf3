"""The graph domain: sets of graphs diffused as discrete categories over nodes and node pairs.

Fields: `edge_type`, one category per unordered node pair {i < j} (0 no edge, then the edge labels),
on the pair level; `node_type` on the node level when the graphs carry two or more node labels. The
adjacency is symmetric along the whole path by construction: a pair is one variable, never two.
The number of nodes is drawn from the chosen expert's node-count histogram (`statistics`), so each
cluster keeps its own sizes.

Noise model: the absorbing (masking) path of `archipelago.experts.paths.MaskedPath`, the model
predicting the posterior over clean categories as DiGress does. DiGress prefers a marginal transition
(noisy graphs as sparse as the data); here every expert must share one prior for the DDM mixture
u = sum_k p(k | x_t, t) u^(k) to hold, and per-cluster marginals would give each expert its own. The
masked prior is one point mass for all experts, mixes posteriors exactly, and lets the network tell
unknown pairs from absent edges. Its cost: the sampler reveals pairs independently within a step,
so it needs more steps than a marginal path to keep correlated edges consistent.

Sources for `ingest`: the synthetic benchmarks by name ("community-small", "planar", "sbm", with
":train", ":val", ":test" or ":all"; the training split by default), a list of networkx graphs or
torch-geometric `Data` objects, an `InMemoryDataset`, a folder of edge-list files, one edge table
with a graph id column, a records Parquet file or Arrow table. Inputs are normalised (self-loops
removed, directions and multi-edges merged: counted and logged); empty and one-node graphs (no
pairs to diffuse) and graphs above `max_nodes` are dropped with counts, and more than `max_dropped`
of them is an error naming them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch_geometric.data import Data

from archipelago.domains.graphs import data, io, metrics, synthetic, writers
from archipelago.domains.graphs.networks import GraphNetConfig, GraphTransformer
from archipelago.experts.batch import Batch, Fields, FieldSpec, Layout
from archipelago.experts.conditions import Condition
from archipelago.experts.data import LevelSamples
from archipelago.experts.domain import Domain
from archipelago.experts.paths import MaskedPath

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test", "all")


class GraphConfig(BaseModel):
    """Inputs, networks, and (once data is ingested) the fitted vocabularies and condition classes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_nodes: int = Field(64, ge=2)  # larger input graphs are dropped (and counted)
    max_dropped: float = Field(0.05, ge=0.0, le=1.0)  # share of input graphs that may be dropped
    require_connected: bool = False  # a disconnected training graph is an error (planar, community benchmarks)
    conditions: list[str] = []  # graph attributes used as conditions (e.g. "communities" of SBM)
    validity: Literal["planar", "sbm"] | None = None  # what `evaluate` counts as valid for V.U.N.
    seed: int = 0  # seed of the synthetic benchmarks
    width: int = Field(64, ge=4)  # node and graph channels of the denoiser
    edge_width: int = Field(16, ge=2)  # pair channels of the denoiser
    depth: int = Field(4, ge=1)  # denoiser layers
    heads: int = Field(4, ge=1)  # attention heads (denoiser and router)
    reveal_noise: bool = False  # the denoiser reads masked entries' reveal noise (distill's few-step student)
    router_width: int = Field(32, ge=4)
    router_depth: int = Field(2, ge=1)
    node_labels: list[str] | None = None  # fitted: the node label vocabulary (None: unlabelled nodes)
    edge_labels: list[str] | None = None  # fitted: the edge label vocabulary (None: unlabelled edges)
    condition_classes: dict[str, list[str] | None] = {}  # fitted: classes per condition (None: continuous)


def _benchmark(source: Any) -> tuple[str, str] | None:
    """(benchmark, split) when `source` names a synthetic benchmark, else None."""
    if not isinstance(source, str):
        return None
    name, _, split = source.partition(":")
    if name not in synthetic.BENCHMARKS:
        return None
    split = split or "train"
    if split not in SPLITS:
        raise ValueError(f"{source!r}: unknown split {split!r}; choose one of {list(SPLITS)}")
    return name, split


class GraphDomain(Domain):
    """Undirected simple graphs with optional categorical node and edge labels and graph conditions."""

    name = "graphs"

    def __init__(self, config: GraphConfig | dict[str, Any] | None = None, **overrides: Any):
        merged = {**(config.model_dump() if isinstance(config, GraphConfig) else (config or {})), **overrides}
        self.config = GraphConfig(**merged)

    # --- fields and layout ---------------------------------------------------------------------------

    @property
    def node_field(self) -> bool:
        """Whether node labels are diffused (two or more labels; one label is decoded, not diffused)."""
        return len(self.config.node_labels or []) >= 2

    @property
    def edge_categories(self) -> int:
        return 1 + max(1, len(self.config.edge_labels or []))

    @property
    def fields(self) -> Fields:
        fields = {"edge_type": FieldSpec(MaskedPath(self.edge_categories), index="pair_batch")}
        if self.node_field:
            fields["node_type"] = FieldSpec(MaskedPath(len(self.config.node_labels)), index="node_batch")
        return fields

    @property
    def layout(self) -> Layout:
        return Layout.of(self.fields, rows={"pair_index": "pair_batch"}, links={"pair_index": "node_batch"})

    @property
    def conditions(self) -> dict[str, Condition]:
        return {name: Condition(name, classes=tuple(classes) if classes is not None else None)
                for name, classes in sorted(self.config.condition_classes.items())}

    # --- records ---------------------------------------------------------------------------------------

    def ingest(self, source: Any, fit: bool = True) -> pa.Table:
        """Read, normalise and check graphs (see the module docstring) as records. fit=True fits the
        label vocabularies and condition classes; fit=False checks the graphs against them."""
        graphs = self.read(source)
        clean, counts = io.normalize(graphs, max_nodes=self.config.max_nodes)
        # A one-node graph has no pairs to diffuse: nothing to learn or generate.
        counts["single_node_dropped"] = sum(g.number_of_nodes() == 1 for g in clean)
        clean = [g for g in clean if g.number_of_nodes() >= 2]
        if counts["single_node_dropped"]:
            log.warning("dropped %d one-node graphs", counts["single_node_dropped"])
        self._check_drops(len(graphs), counts, graphs)
        if fit and self.config.require_connected:  # generated graphs read back may be disconnected
            broken = [g.graph["id"] for g in clean if not nx.is_connected(g)]
            if broken:
                raise ValueError(f"{len(broken)} input graph(s) are disconnected and require_connected is set: "
                                 f"{broken[:5]}")
        if fit:
            self.config = self.config.model_copy(update=self._fitted(clean))
        else:
            self._check_vocabulary(clean)
        return self._records(clean)

    def _records(self, graphs: Sequence[nx.Graph]) -> pa.Table:
        """Canonical graphs as records with the run's vocabularies and condition columns."""
        c = self.config
        return data.graphs_to_table(graphs, c.condition_classes, node_labels=c.node_labels is not None,
                                    edge_labels=c.edge_labels is not None)

    def read(self, source: Any) -> list[nx.Graph]:
        """A source as canonical networkx graphs (before normalisation)."""
        named = _benchmark(source)
        if named is not None:
            splits = synthetic.benchmark(named[0], seed=self.config.seed)
            return [g for part in splits.values() for g in part] if named[1] == "all" else splits[named[1]]
        if isinstance(source, pa.Table):
            return data.table_to_graphs(source)
        if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".parquet":
            return data.table_to_graphs(data.read_parquet(source))
        if isinstance(source, str) and not Path(source).exists():
            raise ValueError(f"{source!r} is neither a file or folder nor a benchmark ({sorted(synthetic.BENCHMARKS)})")
        return io.read_graphs(source)

    def _check_drops(self, total: int, counts: Mapping[str, int], graphs: Sequence[nx.Graph]) -> None:
        if total == 0:
            raise ValueError("the input holds no graphs")
        dropped = sum(counts.get(key, 0) for key in ("empty_dropped", "single_node_dropped", "too_large_dropped"))
        if dropped > self.config.max_dropped * total or dropped == total:
            empty = [g.graph.get("id") for g in graphs if g.number_of_nodes() < 2]
            large = [g.graph.get("id") for g in graphs if g.number_of_nodes() > self.config.max_nodes]
            raise ValueError(f"{dropped} of {total} input graphs would be dropped (more than max_dropped = "
                             f"{self.config.max_dropped}): empty or one-node {empty[:5]}, over max_nodes = "
                             f"{self.config.max_nodes} {large[:5]}")

    def _fitted(self, graphs: Sequence[nx.Graph]) -> dict[str, Any]:
        """Vocabularies of node and edge labels and the classes of each condition."""
        node = _labels((attrs for g in graphs for _, attrs in g.nodes(data=True)), "node", graphs)
        edge = _labels((attrs for g in graphs for _, _, attrs in g.edges(data=True)), "edge", graphs)
        classes = {name: _classes(name, [g.graph.get(name) for g in graphs]) for name in self.config.conditions}
        return {"node_labels": node, "edge_labels": edge, "condition_classes": classes}

    def _check_vocabulary(self, graphs: Sequence[nx.Graph]) -> None:
        c = self.config
        for g in graphs:
            for kind, vocab, items in (("node", c.node_labels, g.nodes(data=True)),
                                       ("edge", c.edge_labels, g.edges(data=True))):
                for item in items:
                    label = item[-1].get("label")
                    if vocab is not None and (label is None or str(label) not in vocab):
                        raise ValueError(f"graph {g.graph.get('id')!r}: {kind} label {label!r} is not in the "
                                         f"run's vocabulary {vocab}")
            for name, classes in c.condition_classes.items():
                value = g.graph.get(name)
                if classes is not None and value is not None and str(value) not in classes:
                    raise ValueError(f"graph {g.graph.get('id')!r}: condition {name!r} = {value!r} is not one of "
                                     f"the run's classes {classes}")

    def samples(self, table: pa.Table) -> LevelSamples:
        """Records as a node level (node labels) and a pair level (edge categories, pair_index)."""
        c, rows = self.config, table.to_pylist()
        sizes = np.array([r["num_nodes"] for r in rows], dtype=np.int64)
        edge_codes = {label: i for i, label in enumerate(c.edge_labels or [])}
        edges = [data.edge_categories(r["num_nodes"], r["src"], r["dst"],
                                      [edge_codes[v] for v in r["edge_label"]] if c.edge_labels else None)
                 for r in rows]
        pairs = [data.pair_rows(int(n)) for n in sizes]
        pair_level = {"edge_type": torch.from_numpy(np.concatenate(edges or [np.zeros(0, np.int64)])),
                      "pair_index": torch.from_numpy(np.concatenate(pairs or [np.zeros((0, 2), np.int64)])).long()}
        node_level = {}
        if self.node_field:
            codes = {label: i for i, label in enumerate(c.node_labels)}
            node_level["node_type"] = torch.tensor([codes[v] for r in rows for v in r["node_label"]], dtype=torch.long)
        dense = {name: torch.tensor([condition.encode(r[name]) for r in rows], dtype=condition.dtype)
                 for name, condition in self.conditions.items()}
        return LevelSamples({"node_batch": (node_level, torch.from_numpy(sizes)),
                             "pair_batch": (pair_level, torch.from_numpy(sizes * (sizes - 1) // 2))},
                            dense=dense, links={"pair_index": "node_batch"})

    def features(self, table: pa.Table) -> np.ndarray:
        return np.stack([data.graph_features(g) for g in data.table_to_graphs(table)])

    def statistics(self, table: pa.Table) -> dict[str, list[float]]:
        return {"nodes": np.bincount(table.column("num_nodes").to_numpy()).astype(float).tolist()}

    # --- networks ------------------------------------------------------------------------------------

    def _net_config(self, **overrides: Any) -> GraphNetConfig:
        c = self.config
        return GraphNetConfig(node_categories=len(c.node_labels) if self.node_field else 0,
                              edge_categories=self.edge_categories, max_nodes=c.max_nodes,
                              conditions=tuple(self.conditions.values()), heads=c.heads, **overrides)

    def denoiser_network(self) -> nn.Module:
        c = self.config
        return GraphTransformer(self._net_config(width=c.width, edge_width=c.edge_width, depth=c.depth,
                                                 reveal_noise=c.reveal_noise))

    def router_network(self, num_experts: int) -> nn.Module:
        c = self.config
        return GraphTransformer(self._net_config(width=c.router_width, edge_width=max(2, c.edge_width // 2),
                                                 depth=c.router_depth, outputs=num_experts))

    # --- sampling ------------------------------------------------------------------------------------

    def template(self, n: int, generator: torch.Generator | None = None, statistics: dict | None = None,
                 given: Mapping[str, Any] | None = None) -> Batch:
        """n graphs' node and pair levels; sizes from the node-count histogram, or from given node labels."""
        if given and "node_type" in given:
            sizes = torch.tensor([len(labels) for labels in self._given_lists(given["node_type"], n)])
        else:
            counts = (statistics or {}).get("nodes")
            if not counts or sum(counts) <= 0:
                raise ValueError("graph templates need the node-count histogram (statistics['nodes']) of a fitted run")
            sizes = torch.multinomial(torch.tensor(counts, dtype=torch.float64), n, replacement=True,
                                      generator=generator)
        pairs = [torch.from_numpy(data.pair_rows(int(size))) for size in sizes]
        starts = torch.cumsum(sizes, 0) - sizes
        pair_counts = torch.tensor([len(p) for p in pairs], dtype=torch.long)
        out = {"node_batch": torch.repeat_interleave(torch.arange(n), sizes),
               "pair_batch": torch.repeat_interleave(torch.arange(n), pair_counts),
               "pair_index": torch.cat([p + s for p, s in zip(pairs, starts, strict=True)]).long().reshape(-1, 2),
               "edge_type": torch.zeros(int(pair_counts.sum()), dtype=torch.long)}
        if self.node_field:
            out["node_type"] = torch.zeros(int(sizes.sum()), dtype=torch.long)
        return out

    def _given_lists(self, value: Any, n: int) -> list[list[Any]]:
        lists = list(value)
        if len(lists) != n or not all(isinstance(labels, (list, tuple, np.ndarray)) for labels in lists):
            raise ValueError(f"given field 'node_type' needs one list of node labels per graph ({n} graphs)")
        return [list(labels) for labels in lists]

    def given_values(self, given: Mapping[str, Any], template: Batch) -> dict[str, torch.Tensor]:
        """Node labels given per graph (names or indices of the vocabulary), as in structure prediction."""
        unknown = sorted(set(given) - {"node_type"})
        if unknown or (given and not self.node_field):
            raise ValueError(f"only node_type can be given, and only for graphs with node labels; got {sorted(given)}")
        if not given:
            return {}
        vocab = self.config.node_labels
        n = int(template["node_batch"].max()) + 1 if len(template["node_batch"]) else 0
        codes = [[vocab.index(str(v)) if str(v) in vocab else _index(v, vocab) for v in labels]
                 for labels in self._given_lists(given["node_type"], n)]
        return {"node_type": torch.tensor([v for labels in codes for v in labels], dtype=torch.long)}

    def decode(self, batch: Batch) -> list[nx.Graph]:
        """Generated graphs as canonical networkx graphs: label names, conditions in `g.graph`."""
        c = self.config
        nodes = batch["node_batch"].cpu()
        count = int(nodes.max()) + 1 if len(nodes) else 0
        sizes = torch.bincount(nodes, minlength=count).tolist()
        starts = np.cumsum([0, *sizes])
        graphs = [nx.Graph(id=f"sample-{g}") for g in range(count)]
        for g, size in enumerate(sizes):
            graphs[g].add_nodes_from(range(size))
        node_types = batch["node_type"].cpu().tolist() if self.node_field else None
        if c.node_labels:
            for g, graph in enumerate(graphs):
                labels = node_types[starts[g]:starts[g + 1]] if node_types else [0] * graph.number_of_nodes()
                nx.set_node_attributes(graph, {i: c.node_labels[v] for i, v in enumerate(labels)}, "label")
        edge = batch["edge_type"].cpu()
        present = ((edge > 0) & (edge < self.edge_categories)).nonzero().squeeze(1)
        owner = batch["pair_batch"].cpu()[present].tolist()
        ends = batch["pair_index"].cpu()[present].tolist()
        for g, (i, j), category in zip(owner, ends, edge[present].tolist(), strict=True):
            label = {"label": c.edge_labels[category - 1]} if c.edge_labels else {}
            graphs[g].add_edge(i - int(starts[g]), j - int(starts[g]), **label)
        for name, condition in self.conditions.items():
            if name in batch:
                for graph, value in zip(graphs, batch[name].cpu().tolist(), strict=True):
                    if not (value == condition.null if condition.categorical else math.isnan(value)):
                        graph.graph[name] = condition.classes[int(value)] if condition.categorical else value
        return graphs

    def decode_data(self, batch: Batch) -> list[Data]:
        """Generated graphs as torch-geometric `Data`: label codes of the vocabularies in `x` and `edge_attr`."""
        c = self.config
        return [writers.to_data(g, c.node_labels, c.edge_labels) for g in self.decode(batch)]

    def sample_records(self, batch: Batch) -> pa.Table:
        """Generated graphs as records (the Parquet format `ingest` reads back)."""
        return self._records(self.decode(batch))

    def evaluate(self, real: pa.Table, generated: Batch, **options: Any) -> dict[str, Any]:
        """The metrics of ANCHORS.md (`metrics.graph_metrics`) against `real`: squared MMDs of degree,
        clustering, orbit and spectral statistics; with `train` (a source or records), uniqueness,
        novelty, validity and V.U.N. (validity from the config, or `validity=`), and the train-vs-real
        MMD of each statistic as `reference_<name>`. `kernel`: "tv" (SPECTRE, DiGress) or "emd" (GDSS);
        `metrics`: the names to report (all by default)."""
        for unused in ("progress", "repeats", "seed"):  # the metrics of given samples are deterministic
            options.pop(unused, None)
        train = options.pop("train", None)
        validity = options.pop("validity", self.config.validity)
        kernel = options.pop("kernel", "tv")
        names = options.pop("metrics", None)
        if options:
            raise ValueError(f"unknown evaluate options {sorted(options)}: choose from train, validity, kernel, "
                             f"metrics")
        reference = metrics.describe(data.table_to_graphs(real))  # once, for the samples and the baseline
        train_graphs = None if train is None else data.table_to_graphs(
            train if isinstance(train, pa.Table) else self.ingest(train, fit=False))
        graphs = self.decode(generated)
        scores = {**metrics.mmds(reference, metrics.describe(graphs), kernel),
                  **metrics.sample_metrics(graphs, train_graphs, validity)}
        if train_graphs is not None:
            baseline = metrics.mmds(reference, metrics.describe(train_graphs), kernel)
            scores.update({f"reference_{k}": v for k, v in baseline.items()})
        if names:
            unknown = sorted(set(names) - set(scores))
            if unknown:
                raise ValueError(f"unknown graph metrics {unknown}; these were computed: {sorted(scores)}")
            scores = {name: scores[name] for name in names}
        return scores

    def to_config(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GraphDomain:
        return cls(config)


def _labels(items: Any, kind: str, graphs: Sequence[nx.Graph]) -> list[str] | None:
    """The sorted label vocabulary of nodes or edges; None when nothing is labelled. Some labelled
    and some not is an error."""
    labels = [item.get("label") for item in items]
    if not labels or all(label is None for label in labels):
        return None
    if any(label is None for label in labels):
        ids = [g.graph.get("id") for g in graphs][:5]
        raise ValueError(f"some {kind}s carry a 'label' and some do not (graphs {ids}...): label all or none")
    return sorted({str(label) for label in labels})


def _classes(name: str, values: Sequence[Any]) -> list[str] | None:
    """A condition's classes: sorted names for integer or string values, None (continuous) for floats."""
    present = [v for v in values if v is not None]
    if not present:
        raise ValueError(f"condition {name!r} is not an attribute of any input graph")
    if all(isinstance(v, (str, bool, int, np.integer)) for v in present):
        return sorted({str(v) for v in present}, key=lambda s: (len(s), s))
    return None


def _index(value: Any, vocab: Sequence[str]) -> int:
    if isinstance(value, (int, np.integer)) and 0 <= int(value) < len(vocab):
        return int(value)
    raise ValueError(f"node label {value!r} is neither in the vocabulary {list(vocab)} nor an index into it")
