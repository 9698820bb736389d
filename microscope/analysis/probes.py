"""Per-layer linear probes: can a label be read linearly off each layer's activations?

For every hook (default: each block's ``hook_resid_post``) a standardised logistic regression
(scikit-learn) is fitted on a training split and scored on held-out examples. Splits are by
prompt (``groups``), so tokens of one prompt never sit on both sides. Chance is the majority-class
rate of the held-out labels.

Features come either live from a scope or from an activation store:

    result = layer_probes(scope, prompts, labels)                       # one row per prompt
    result = layer_probes(ms.open_store("run.zarr"), labels="hateful")  # metadata field or array
    result.test_accuracy, result.best_hook, result.direction(result.best_hook)

Positions: ``"last"`` (each prompt's last real / last stored token: one example per prompt),
``"mean"`` (mean over a prompt's tokens) or ``"all"`` (every token is an example; labels then
per token, or per prompt and broadcast to its tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import GroupShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from microscope.activations.reader import ActivationStore
from microscope.analysis.inputs import TextsOrIds, last_positions, token_batch
from microscope.analysis.results import Result
from microscope.errors import AnalysisInputError, UnknownHookError
from microscope.names import every_layer, parse, resolve
from microscope.scope import Scope
from microscope.viz.figures import line_plot

POSITIONS = ("last", "mean", "all")
DEFAULT_HOOKS = every_layer("resid_post")


@dataclass(repr=False)
class ProbeResult(Result):
    """Probe accuracies per hook, in model order.

    hooks: hook names; train_accuracy/test_accuracy: [hook]; chance: majority-class rate on the
    held-out split; directions: [hook, d] each probe's weight vector in raw activation units
    (classes[1] positive; for more than two classes, the first class's row); classes: labels seen."""

    hooks: list[str]
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray
    chance: float
    n_train: int
    n_test: int
    directions: np.ndarray
    classes: list
    title: str = "linear probes"

    @property
    def best_hook(self) -> str:
        return self.hooks[int(np.argmax(self.test_accuracy))]

    def direction(self, hook: str) -> torch.Tensor:
        """Unit-norm probe direction [d] of one hook (raw activation space)."""
        d = torch.as_tensor(self.directions[self.hooks.index(hook)], dtype=torch.float32)
        return d / d.norm()

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(dict(hook=self.hooks, layer=[_layer(h) for h in self.hooks],
                                 train_accuracy=self.train_accuracy, test_accuracy=self.test_accuracy,
                                 chance=self.chance, n_train=self.n_train, n_test=self.n_test))

    def figures(self) -> list[go.Figure]:
        x = [_layer(h) if _layer(h) is not None else h for h in self.hooks]
        return [line_plot({"held-out": self.test_accuracy, "train": self.train_accuracy}, x=x,
                          title="linear probe accuracy by layer", x_title="layer", y_title="accuracy",
                          hline=self.chance)]

    def summary(self) -> dict:
        return {"best_hook": self.best_hook, "best_test_accuracy": round(float(self.test_accuracy.max()), 4),
                "chance": round(float(self.chance), 4), "n_test": self.n_test}


def _layer(hook: str) -> int | None:
    """The block of a hook name; None outside the blocks or for a feature name that is no hook."""
    try:
        return parse(hook).layer
    except UnknownHookError:
        return None


def train_probes(features: dict[str, np.ndarray | torch.Tensor], labels: Sequence, *,
                 groups: Sequence[int] | None = None, test_fraction: float = 0.25, seed: int = 0,
                 C: float = 1.0, max_iter: int = 2000, classifier: str = "logistic") -> ProbeResult:
    """Fit one linear probe per hook on features {hook: [N, d]} and labels [N].

    groups: [N] ids (e.g. prompt ids) kept together on one side of the split (default: each
    example its own group); test_fraction: share held out; C: inverse L2 strength; classifier:
    "logistic" (logistic regression) or "ridge" (least squares on +-1 targets, L2 strength 1/C)."""
    if classifier not in ("logistic", "ridge"):
        raise AnalysisInputError(f"classifier must be 'logistic' or 'ridge', got {classifier!r}")
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        raise AnalysisInputError(f"probes need at least two classes; the labels hold only {np.unique(y)}")
    n = len(y)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    split = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    train, test = next(split.split(np.zeros(n), y, groups))
    if len(np.unique(y[train])) < 2:
        raise AnalysisInputError("the training split holds one class only; give more or better-mixed examples")
    values, counts = np.unique(y[test], return_counts=True)
    chance = counts.max() / counts.sum()
    hooks, train_acc, test_acc, directions = [], [], [], []
    for hook, x in features.items():
        x = x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        if len(x) != n:
            raise AnalysisInputError(f"{hook}: {len(x)} feature rows for {n} labels")
        clf = LogisticRegression(C=C, max_iter=max_iter) if classifier == "logistic" else RidgeClassifier(alpha=1 / C)
        model = make_pipeline(StandardScaler(), clf)
        model.fit(x[train], y[train])
        scaler, clf = model[0], model[1]
        hooks.append(hook)
        train_acc.append(model.score(x[train], y[train]))
        test_acc.append(model.score(x[test], y[test]))
        directions.append(clf.coef_[0] / scaler.scale_)
    return ProbeResult(hooks=hooks, train_accuracy=np.array(train_acc), test_accuracy=np.array(test_acc),
                       chance=float(chance), n_train=len(train), n_test=len(test),
                       directions=np.stack(directions), classes=list(np.unique(y)))


@torch.no_grad()
def live_features(scope, prompts: TextsOrIds, hooks: str | Sequence[str] = DEFAULT_HOOKS, *,
                  position: str = "last", attention_mask: torch.Tensor | None = None,
                  batch_size: int = 32) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """({hook: [N, d]}, prompt index [N]) from running prompts through the scope."""
    if position not in POSITIONS:
        raise AnalysisInputError(f"position must be one of {POSITIONS}, got {position!r}")
    names = scope.resolve_names(hooks)
    ids, mask = token_batch(scope, prompts, attention_mask)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    prompt_index = []
    for start in range(0, len(ids), batch_size):
        b_ids, b_mask = ids[start:start + batch_size], mask[start:start + batch_size]
        _, cache = scope.run_with_cache(b_ids, names=names, attention_mask=b_mask)
        rows = torch.arange(len(b_ids))
        keep = b_mask.bool()
        for name in names:
            act = cache[name].float().cpu().flatten(2)  # [batch, pos, d]
            if position == "last":
                out[name].append(act[rows, last_positions(b_mask)])
            elif position == "mean":
                out[name].append((act * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))
            else:
                out[name].append(act[keep])
        if position == "all":
            prompt_index.append((rows[:, None] + start).expand_as(keep)[keep])
        else:
            prompt_index.append(rows + start)
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(prompt_index).numpy()


def store_features(store, hooks: str | Sequence[str] = DEFAULT_HOOKS, *, position: str = "last"
                   ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """({hook: [N, d]}, prompt id [N]) read from an activation store (`microscope.open_store`).

    Reads each hook's whole flat token axis once; "last" is each prompt's last stored token."""
    if position not in POSITIONS:
        raise AnalysisInputError(f"position must be one of {POSITIONS}, got {position!r}")
    names = resolve(hooks, store.hooks, where="this store")
    offsets = np.asarray(store.prompt_offsets, dtype=np.int64)
    sizes = np.diff(offsets)
    present = np.nonzero(sizes > 0)[0]
    prompt_of_row = np.repeat(np.arange(len(sizes)), sizes)
    features = {}
    for name in names:
        x = store[name].torch()[:].float().flatten(1)  # [T, d]
        if position == "last":
            features[name] = x[torch.as_tensor(offsets[1:][present] - 1)]
        elif position == "mean":
            sums = torch.zeros(len(sizes), x.shape[1]).index_add_(0, torch.as_tensor(prompt_of_row), x)
            features[name] = sums[present] / torch.as_tensor(sizes[present], dtype=torch.float32)[:, None]
        else:
            features[name] = x
    return features, (prompt_of_row if position == "all" else present)


def layer_probes(source, prompts: TextsOrIds | None = None, labels: Sequence | str | None = None, *,
                 hooks: str | Sequence[str] = DEFAULT_HOOKS, position: str = "last",
                 test_fraction: float = 0.25, seed: int = 0, C: float = 1.0) -> ProbeResult:
    """Probe every matching hook for `labels`, from a live scope or an activation store.

    source: a Scope (then `prompts` are run) or an ActivationStore (then `prompts` is ignored and
    must be None); labels: one per prompt (broadcast to tokens with position="all"), one per token
    with position="all", or (store) the name of a prompt-metadata field."""
    if labels is None:
        raise AnalysisInputError("give labels: one per prompt, or a metadata field name for a store")
    is_store = isinstance(source, ActivationStore)
    if not is_store and not isinstance(source, Scope):
        raise AnalysisInputError(f"source must be a Scope or an ActivationStore, not {type(source).__name__}")
    if is_store:
        if prompts is not None:
            raise AnalysisInputError("a store already holds its prompts: pass labels=..., not prompts")
        features, prompt_ids = store_features(source, hooks, position=position)
        if isinstance(labels, str):
            labels = [source.prompt_metadata(i).get(labels) for i in range(source.n_prompts)]
            if any(v is None for v in labels):
                raise AnalysisInputError("some prompts of this store have no metadata field for the labels")
    else:
        if prompts is None:
            raise AnalysisInputError("give the prompts to run through the scope")
        features, prompt_ids = live_features(source, prompts, hooks, position=position)
    labels = np.asarray(labels)
    n_rows = len(prompt_ids)
    if len(labels) != n_rows:
        if position == "all" or is_store:
            labels = labels[prompt_ids]  # per-prompt labels broadcast to rows
        else:
            raise AnalysisInputError(f"{len(labels)} labels for {n_rows} prompts")
    return train_probes(features, labels, groups=prompt_ids, test_fraction=test_fraction, seed=seed, C=C)
