"""One expert as a denoiser, and the flow-matching objective that trains it.

`Denoiser` wraps a domain's network (which knows nothing of paths or prediction types) and
returns, per field, the mixable quantity of its path (velocity or posterior p(x_0 | x_t)). It has
the calling convention every solver expects, `denoiser(x_t, t) -> {field: tensor}`, as does the
router-weighted `Ensemble`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archipelago.experts.batch import Batch, Fields, given_key, num_samples, per_row, with_fields
from archipelago.experts.conventions import Prediction
from archipelago.experts.paths import PathSample


@dataclass(frozen=True)
class NoisedBatch:
    """x_t for every field, with the per-field path samples (targets) and per-sample times."""

    x_t: Batch
    samples: dict[str, PathSample]
    t: Tensor


def noise_batch(batch: Batch, fields: Fields, generator: torch.Generator | None,
                prediction: Prediction = Prediction.VELOCITY, t: Tensor | None = None,
                given: Mapping[str, Tensor] | None = None,
                noise: Mapping[str, Tensor] | None = None) -> NoisedBatch:
    """Draw t ~ U[0, 1] per sample (unless t is passed) and x_t ~ p_t(. | x_0) for every field
    (on the path to the field's given noise end in `noise`, where there is one).

    `given` masks (True: the entry is fixed by the user) keep those entries at x_0, leave them out
    of the loss, and travel in x_t under `given_key(field)` so that the network can tell them apart.
    """
    if t is None:
        b = num_samples(batch, fields)
        first = batch[sorted(fields)[0]]
        t = torch.rand(b, generator=generator, device=first.device)
    samples = {}
    for name, spec in sorted(fields.items()):
        sample = spec.path.sample(batch[name], per_row(t, batch, spec), generator, prediction,
                                  noise=(noise or {}).get(name))
        mask = (given or {}).get(name)
        if mask is not None:
            sample = PathSample(x_t=torch.where(mask, batch[name], sample.x_t), target=sample.target, free=~mask)
        samples[name] = sample
    x_t = with_fields(batch, fields, {name: s.x_t for name, s in samples.items()})
    x_t.update({given_key(name): mask for name, mask in (given or {}).items()})
    return NoisedBatch(x_t=x_t, samples=samples, t=t)


def denoising_loss(net: nn.Module, fields: Fields, batch: Batch, generator: torch.Generator | None,
                   prediction: Prediction = Prediction.VELOCITY, given: Mapping[str, Tensor] | None = None,
                   noise: Mapping[str, Tensor] | None = None) -> Tensor:
    """The sum over fields of each path's loss, times the field's weight, at x_t, t ~ U[0, 1] (flow
    matching for Gaussian fields), x_t on the path to the given `noise` ends where there are any."""
    noised = noise_batch(batch, fields, generator, prediction, given=given, noise=noise)
    output = net(noised.x_t, noised.t)
    return sum(spec.weight * spec.path.loss(output[name], noised.samples[name])
               for name, spec in sorted(fields.items()))


class Denoiser(nn.Module):
    """A trained network and the paths of its fields: (x_t, t) -> mixable quantity per field."""

    def __init__(self, net: nn.Module, fields: Fields, prediction: Prediction = Prediction.VELOCITY):
        super().__init__()
        for spec in fields.values():
            if spec.path.predictions != (Prediction.X0,):  # categorical paths always predict x_0
                spec.path.check_prediction(prediction)
        self.net, self.fields, self.prediction = net, fields, Prediction(prediction)

    def forward(self, x_t: Batch, t: Tensor) -> dict[str, Tensor]:
        output = self.net(x_t, t)
        return {
            name: spec.path.mixable(output[name], x_t[name], per_row(t, x_t, spec), self.prediction)
            for name, spec in sorted(self.fields.items())
        }
