"""Distillation of an ensemble into one student network: the dense student, then a few-step student by reflow.

- Dense student (`distillation_loss`), as the DDM paper distils its ensemble: at x_t drawn along
  every field's path from the run's own data, the student matches the teacher's mixable quantity,
  the ensemble's mixture sum_k p(k | x_t, t) u^(k)(x_t). Velocities (Euclidean and torus fields)
  by squared error, posteriors of discrete fields by cross-entropy against the mixed posterior (the
  KL divergence up to the teacher's entropy), generated entries only. Its optimum is the full
  mixture itself, which the DDM identity makes the whole data set's field.
- Few-step student (`reflow_loss`: rectified flow's reflow, Liu et al. 2023): flow matching on
  pairs (x_1, x_0) of noise and the ensemble's sample integrated from that noise, x_t on the path
  between the two. The student's flow carries the same coupling on straighter paths, which a few
  Euler steps integrate well; `straightness` measures how straight a flow is.

Why reflow rather than consistency distillation: reflow needs the teacher only to make the pairs,
once and in parallel, stored like every other step's output (so distillation resumes), and its
loss is the experts' own flow matching on the same network and solvers. Consistency distillation
queries the whole ensemble at every training step and needs a target network; it would be another
loss over the same pairs or data here.

Discrete fields: the masked path's x_1 is a point mass (every entry masked), and its sampler draws
as it goes: which entries a step reveals, and their classes from the posterior, each entry
independently of the others revealed in the same step. A student trained on posteriors alone
(the dense student, or multi-step matching) therefore loses the correlations between entries
revealed together, and in 1 to 4 steps almost all are (on graphs, the community structure). Our
treatment makes the discrete sampler deterministic too, as reflow's pairs need: the teacher's pairs
are sampled with every entry's randomness drawn up front, a reveal time tau and a uniform u (the
same law: see `MaskedPath`), and that reveal noise is the discrete fields' noise end of the pair. The
student reads it (`RevealEmbedding` in its network) and learns the map from it to the teacher's
sample, joint structure included, by cross-entropy on x_t masked where tau < t; its own few-step
sampler reveals by the same noise. What it costs: two numbers per entry in the pairs and as the
student's input, and a network that can read them (the graph and crystal denoisers can; a domain's
denoiser without one learns no correlations from the noise).

No Ray and no MLflow here; the platform schedules the pairs and the trainings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from archipelago.experts.batch import NOISE_SUFFIX, Batch, Fields, noise_key, per_row, reveal_key
from archipelago.experts.conditions import drop_conditions
from archipelago.experts.conventions import Prediction
from archipelago.experts.data import Samples
from archipelago.experts.denoiser import denoising_loss, noise_batch
from archipelago.experts.domain import Domain, Statistics
from archipelago.experts.paths import GaussianPath
from archipelago.experts.solvers import integrate
from archipelago.experts.training import OnLog, ProgressBar, TrainConfig, TrainResult, run_training, seeded

Teacher = Callable[[Batch, Tensor], Mapping[str, Tensor]]  # (x_t, t) -> mixable quantity per field


def check_student_fields(domain: Domain, student: Domain, statistics: Statistics | None = None) -> None:
    """A student must diffuse the run's fields on the same paths and levels; raise naming what differs.
    `statistics` (the run's merged ones) let domains whose templates draw sizes build one."""
    theirs, ours = domain.fields, student.fields
    differing = sorted(set(theirs) ^ set(ours))
    differing += sorted(name for name in set(theirs) & set(ours)
                        if (type(theirs[name].path), theirs[name].index) != (type(ours[name].path), ours[name].index))
    dense = sorted(name for name in set(theirs) & set(ours) if theirs[name].index is None and name not in differing)
    if dense and not differing:  # a dense field's shape (a window's length, an image's size) is part of it
        g = torch.Generator().manual_seed(0)
        run, student_template = domain.template(1, g, statistics), student.template(1, g, statistics)
        differing += [f"{name} (shape {tuple(student_template[name].shape[1:])}, the run's "
                      f"{tuple(run[name].shape[1:])})" for name in dense
                      if run[name].shape[1:] != student_template[name].shape[1:]]
    if differing:
        raise ValueError(f"the student's fields do not match the {domain.name} domain's: {differing} differ "
                         f"(run: {sorted(theirs)}, student: {sorted(ours)}); change only its network settings")


def distillation_loss(net: nn.Module, teacher: Teacher, fields: Fields, batch: Batch, generator: torch.Generator,
                      prediction: Prediction = Prediction.VELOCITY,
                      given: Mapping[str, Tensor] | None = None) -> Tensor:
    """The dense student's loss on a batch of data (see the module docstring)."""
    noised = noise_batch(batch, fields, generator, given=given)
    with torch.no_grad():
        target = teacher(noised.x_t, noised.t)
    output = net(noised.x_t, noised.t)
    return sum(spec.weight * spec.path.match_loss(output[name], target[name], noised.x_t[name],
                                                  per_row(noised.t, noised.x_t, spec), prediction,
                                                  noised.samples[name].free)
               for name, spec in sorted(fields.items()))


def pairs_batch(samples: Batch, noise: Batch, fields: Fields) -> Batch:
    """One batch of (noise, sample) pairs: the sample's tensors with each field's noise end under
    `noise_key`: its x_1, or a discrete field's reveal noise (its x_1, every entry masked, says nothing)."""
    return {**samples, **{noise_key(name): noise[reveal_key(name) if spec.path.stochastic_steps else name]
                          for name, spec in fields.items()}}


def pair_starts(pairs: Batch, fields: Fields) -> Batch:
    """The inverse of `pairs_batch`: the x_1 each pair's sample was sampled from, as `draw_prior(...,
    coupled=True)` lays it out (a discrete field masked, its reveal noise under `reveal_key`)."""
    x_1 = {name: value for name, value in pairs.items() if not name.endswith(NOISE_SUFFIX)}
    for name, spec in fields.items():
        noise = pairs[noise_key(name)]
        if spec.path.stochastic_steps:
            x_1[name], x_1[reveal_key(name)] = spec.path.prior(pairs[name]), noise
        else:
            x_1[name] = noise
    return x_1


def reflow_loss(net: nn.Module, fields: Fields, pairs: Batch, generator: torch.Generator,
                prediction: Prediction = Prediction.VELOCITY, given: Mapping[str, Tensor] | None = None) -> Tensor:
    """Flow matching on (noise, sample) pairs: x_t on the path between each pair's ends. A discrete
    field's x_t is masked where its reveal time is below t, and the student reads the reveal noise."""
    batch = {name: value for name, value in pairs.items() if not name.endswith(NOISE_SUFFIX)}
    noise = {name: pairs[noise_key(name)] for name in fields}
    batch.update({reveal_key(name): noise[name] for name, spec in fields.items() if spec.path.stochastic_steps})
    return denoising_loss(net, fields, batch, generator, prediction, given, noise=noise)


def train_student(domain: Domain, student: Domain, samples: Samples, config: TrainConfig, folder: str,
                  teacher: Teacher | None = None, prediction: Prediction = Prediction.VELOCITY,
                  init: Mapping[str, Tensor] | None = None, teacher_version: int | None = None,
                  on_log: OnLog | None = None, progress_bar: ProgressBar | None = None,
                  statistics: Statistics | None = None) -> TrainResult:
    """Train a student network of `student`'s denoiser on `samples`, checkpointing to `folder`.

    With a `teacher`, the dense student on the run's data (`distillation_loss`); without one, the
    few-step student on pairs (`reflow_loss`), starting from `init` weights (the dense student's).
    Conditions are dropped to null with `condition_dropout` for both, so guidance still works.
    `teacher_version` (the ensemble version distilled) is part of the checkpoint's config, so a
    student of another version never resumes from this one's checkpoints. `statistics`: the run's
    merged ones, for `check_student_fields`.
    """
    check_student_fields(domain, student, statistics)
    net = seeded(student.denoiser_network, config.seed)
    if init is not None:
        net.load_state_dict(init)
    fields, conditions, kind = domain.fields, domain.conditions, "dense" if teacher is not None else "reflow"

    def loss_fn(model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        batch = drop_conditions(batch, conditions, config.condition_dropout, generator)
        given = domain.given_masks(batch, generator)
        if teacher is None:
            return reflow_loss(model, fields, batch, generator, prediction, given)
        return distillation_loss(model, teacher, fields, batch, generator, prediction, given)

    meta = {"kind": "student", "student": kind, "domain": domain.name, "domain_config": student.to_config(),
            "prediction": Prediction(prediction).value,
            "config": {"student": kind, "prediction": Prediction(prediction).value,
                       "domain_config": student.to_config(), "teacher_version": teacher_version}}
    return run_training(net, loss_fn, samples, config, folder, meta, on_log, description=f"{kind} student",
                        progress_bar=progress_bar)


def straightness(model: Teacher, x_1: Batch, fields: Fields, steps: int = 64) -> float:
    """How far a flow is from straight (Liu et al. 2023): the mean over t of E ||(x_1 - x_0) - v(x_t, t)||^2
    along its own Euler trajectory from x_1 to x_0, per entry of its Gaussian fields (0: straight
    lines, which one Euler step integrates exactly)."""
    gaussian = sorted(name for name, spec in fields.items() if isinstance(spec.path, GaussianPath))
    if not gaussian:
        raise ValueError("straightness is defined on continuous (Gaussian) fields; these fields have none")
    velocities = []

    def recording(x_t: Batch, t: Tensor) -> Mapping[str, Tensor]:
        v = model(x_t, t)
        velocities.append({name: v[name] for name in gaussian})
        return v

    x_0 = integrate(recording, x_1, fields, "euler", steps)
    chord = {name: x_1[name] - x_0[name] for name in gaussian}
    gaps = [sum(float(((chord[n] - v[n]) ** 2).sum()) for n in gaussian) for v in velocities]
    entries = sum(chord[n].numel() for n in gaussian)
    return sum(gaps) / len(gaps) / entries
