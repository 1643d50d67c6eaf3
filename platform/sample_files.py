"""Sample files: generated samples written to disk, and read back to be scored.

.npy holds the decoded samples in the user's units ([n, L, C] windows for time series); .csv and
.parquet hold a long table (columns sample, step, then the channels) for domains that decode to
DataFrames; .png is a sample grid, for domains that draw one (`grid(batch)`: images). Domains with
records of their own (`Domain.sample_records`: graphs, crystals, images) write .parquet as
those records, and `read` takes such a file back through `ingest(fit=False)`. `read` takes a .npy
back through the run's own domain (`ingest(fit=False)`: the run's
fitted scaler), so metrics are computed in the scaled space the experts learned, exactly as
`Run.evaluate` does for samples in memory. Errors are ValueErrors naming the file. `score_table`
prints the scores of `evaluate`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from archipelago.experts.domain import Domain
from archipelago.platform.sdk import Samples


def _write_npy(path: str, samples: Samples, domain: Domain) -> None:
    np.save(path, np.asarray(samples.items))


def _frame(samples: Samples, domain: Domain) -> pd.DataFrame:
    decode_frames = getattr(domain, "decode_frames", None)
    if decode_frames is None:
        raise ValueError(f"the {domain.name} domain does not decode to tables: write a .npy file")
    frames = decode_frames(samples.batch)
    return pd.concat([f.assign(sample=i, step=range(len(f))) for i, f in enumerate(frames)], ignore_index=True)[
        ["sample", "step", *frames[0].columns]
    ]


def _writes_records(domain: Domain) -> bool:
    return type(domain).sample_records is not Domain.sample_records


def _write_parquet(path: str, samples: Samples, domain: Domain) -> None:
    if _writes_records(domain):
        pq.write_table(domain.sample_records(samples.batch), path)
    else:
        _frame(samples, domain).to_parquet(path, index=False)


def _write_grid(path: str, samples: Samples, domain: Domain) -> None:
    domain.grid(samples.batch).save(path, format="PNG")


WRITERS: dict[str, Callable[[str, Samples, Domain], None]] = {
    ".npy": _write_npy,
    ".png": _write_grid,
    ".csv": lambda path, samples, domain: _frame(samples, domain).to_csv(path, index=False),
    ".parquet": _write_parquet,
}


def check_suffix(path: str) -> None:
    """Raise ValueError unless `path` names a file type that `write` writes (checked before sampling)."""
    suffix = Path(path).suffix.lower()
    if suffix not in WRITERS:
        raise ValueError(f"{path}: unknown file type {suffix!r}; choose one of {sorted(WRITERS)}")


def check_target(path: str, domain: Domain) -> None:
    """Everything `write` needs, checked before any sampling: a known file type that the domain
    writes, and a folder that exists and can be written (ValueError / OSError naming `path`)."""
    check_suffix(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".png" and getattr(domain, "grid", None) is None:
        raise ValueError(f"{path}: the {domain.name} domain draws no sample grid: write a .npy or .parquet file")
    if _writes_records(domain) and suffix not in (".parquet", ".png"):
        raise ValueError(f"{path}: the {domain.name} domain writes its samples as records: write a .parquet file")
    if suffix != ".npy" and not _writes_records(domain) and getattr(domain, "decode_frames", None) is None:
        raise ValueError(f"{path}: the {domain.name} domain does not decode to tables: write a .npy file")
    folder = Path(path).resolve().parent
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a directory: name a file")
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{path}: cannot write to the folder {folder}")


def write(path: str, samples: Samples, domain: Domain) -> None:
    """Write samples as the file type of `path` says (see the module docstring); a temporary file
    renamed at the end, so a failed write leaves no half-written file and an older one intact."""
    check_target(path, domain)
    suffix = Path(path).suffix.lower()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        WRITERS[suffix](str(tmp), samples, domain)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_attribution(path: str, attribution: pd.DataFrame) -> str:
    """Write the attribution of the samples in `path` beside them, as <stem>.attribution.csv; its path."""
    target = Path(path).with_name(f"{Path(path).stem}.attribution.csv")
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    attribution.to_csv(tmp, index=False)
    os.replace(tmp, target)
    return str(target)


def read(path: str, domain: Domain) -> Samples:
    """Samples from a .npy file in user units (or a .parquet of records), back in the domain's tensors
    (see the module docstring)."""
    expected = ".parquet" if _writes_records(domain) else ".npy"
    if Path(path).suffix.lower() != expected:
        raise ValueError(f"{path}: expected a {expected} file written by `archipelago sample`")
    items = str(path) if _writes_records(domain) else np.load(path, allow_pickle=False)
    table = domain.ingest(items, fit=False)
    batch = domain.samples(table).batch(torch.arange(table.num_rows))
    if _writes_records(domain):
        items = domain.decode(batch)
    return Samples(items=items, batch=batch, strategy="file", expert_calls_per_sample=float("nan"),
                   router_calls_per_sample=float("nan"))


def score_table(scores: Mapping[str, Any], as_json: bool = False) -> str:
    """Metric, mean and 95% half-interval per row (scores with `mean` and `interval`, or plain numbers)."""
    rows = {name: (getattr(s, "mean", s), getattr(s, "interval", 0.0)) for name, s in scores.items()}
    if as_json:
        return json.dumps({name: {"mean": m, "interval": i} for name, (m, i) in rows.items()}, indent=2)
    width = max(len("metric"), *map(len, rows))
    lines = [f"{'metric':<{width}}  {'mean':>10}  {'± 95%':>10}"]
    lines += [f"{name:<{width}}  {m:>10.4f}  {i:>10.4f}" for name, (m, i) in rows.items()]
    return "\n".join(lines)
