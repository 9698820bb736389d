"""The features study: does a dictionary trained on a store find the organism's planted hostile
register, and would the same recipe find it in a model that has none?

    result = run_features_study(scope, store, hooks="blocks.*.hook_resid_post",
                                out="results/features/dictionaries", eval_prompts="toxicity")
    result.summary()   # hostile_latent_auroc (+ _control_max, _clears_control), insult_words_in_top10, fvu, ...

Recipe: train a TopK SAE on each of `hooks` of `store` (the model's activations on a mixed
prompt set), for each sparsity of `k`; take the evaluation prompts (`eval_prompts`, labelled by
`label_field` `positive` or `negative`) that are not in the store; read each one's last-token
activation and encode it. The selection half (a seeded random half of the `pair`s, or of the
prompts) is the validation split: it picks the hook, the k and the latent (highest AUROC for
`positive`, ties broken by the standardised gap of means). That latent is the hostile latent; its
AUROC on the other half, which chose nothing, is the claim (``chosen_on`` in the summary says so).
The control repeats the recipe (the chosen hook and k) on random-init models of the same shape
(`controls.random_init_scopes`): each dumps the same prompts into its own store and trains the
same dictionary; its *best* latent's AUROC on the evaluation half (picked there, so the control is
generous) is the control value. `target_words`: the words the hostile latent should promote
(default: the insult words of the evaluation set's task, ``<set>.task.json``): the claim counts
them among the hostile latent's own top 10 unembedded decoder tokens, against the same count for
each control's own chosen latent; the latent with most of them over the whole dictionary is shown
beside, as exploration, not as the claim. `hostile_latent` measures every claim on a latent the
caller names instead (a hypothesis, or a planted wrong answer that the claims must reject). FVU
over the store and the CE loss recovered on the evaluation prompts (`metrics`) say whether the
chosen dictionary is faithful.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from sklearn.metrics import roc_auc_score

from microscope.activations.dump import dump
from microscope.activations.reader import open_store
from microscope.analysis.controls import DEFAULT_SEEDS, Controlled, random_init_scopes, sentence
from microscope.analysis.features.coder import Dictionary
from microscope.analysis.features.dashboards import FeatureDashboards, feature_dashboards
from microscope.analysis.features.metrics import ce_loss_recovered, reconstruction_metrics
from microscope.analysis.features.train import TrainSettings, train_dictionary
from microscope.analysis.inputs import task_value
from microscope.analysis.progress import Progress, counted, report
from microscope.analysis.results import Result, round_headline
from microscope.errors import AnalysisInputError
from microscope.models import anatomy
from microscope.names import every_layer, resolve
from microscope.prompts import Prompt, load_prompts

TOP_TOKENS = 10


def latent_aurocs(latents: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC [n_latents] of each latent's activation [n, n_latents] for bool labels [n] (0.5 if constant)."""
    return np.array([roc_auc_score(labels, col) if col.std() > 0 else 0.5 for col in latents.T])


def separation(latents: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(mean over positives - mean over negatives) / standard deviation, per latent [n_latents]."""
    gap = latents[labels].mean(0) - latents[~labels].mean(0)
    return gap / (latents.std(0) + 1e-12)


def selection_half(groups: list, seed: int = 0) -> np.ndarray:
    """Bool [n]: the items whose group (e.g. a hostile/friendly pair) is in a seeded random half of
    the groups; pairs stay together, and each half mixes every kind of prompt."""
    unique = sorted(set(groups), key=str)
    chosen = {unique[i] for i in np.random.default_rng(seed).permutation(len(unique))[:len(unique) // 2]}
    return np.array([g in chosen for g in groups])


def last_token_latents(scope, d: Dictionary, texts: list[str]) -> np.ndarray:
    """Latent activations [n_prompts, n_latents] at each prompt's last token."""
    _, cache = scope.run_with_cache(texts, names=[d.hook], positions="last")
    return d.encode_dense(cache[d.hook].float()).numpy()


def top_token_hits(scope, d: Dictionary, words: set[str], vocab: np.ndarray) -> np.ndarray:
    """How many of each latent's top-10 promoted tokens (through the unembedding) are in `words`."""
    hits = []
    for row in d.decoder:
        top = anatomy.unembed_direction(scope.model, row)[:len(vocab)].topk(TOP_TOKENS).indices
        hits.append(sum(str(vocab[int(t)]).strip() in words for t in top))
    return np.array(hits)


def store_prompts(store) -> list[Prompt]:
    """The prompts a store was dumped from (text and metadata)."""
    return [Prompt(store.prompt_text(p), store.prompt_metadata(p)) for p in range(store.n_prompts)]


@dataclass
class Recipe:
    """One model's run of the recipe: its dictionary, per-latent AUROCs and word hits; `named`: a
    latent the caller names as the hostile latent (None: the selection half picks it)."""

    dictionary: Dictionary
    auroc_select: np.ndarray
    separation_select: np.ndarray
    auroc_eval: np.ndarray
    word_hits: np.ndarray
    named: int | None = None

    @property
    def best(self) -> int:
        """The best latent on the selection half: highest AUROC, ties broken by separation."""
        return int(np.lexsort((self.separation_select, self.auroc_select))[-1])

    @property
    def chosen(self) -> int:
        """The hostile latent: the one named, else `best`."""
        return self.best if self.named is None else self.named

    @property
    def word_latent(self) -> int:
        return int(np.argmax(self.word_hits))


def _recipe(scope, store, hook: str, out: Path, settings: TrainSettings, texts: list[str],
            labels: np.ndarray, select: np.ndarray, words: set[str], progress: Progress | None) -> Recipe:
    d = train_dictionary(store, hook, out, settings=settings, resume=False, progress=progress)
    acts = last_token_latents(scope, d, texts)
    return Recipe(d, latent_aurocs(acts[select], labels[select]), separation(acts[select], labels[select]),
                  latent_aurocs(acts[~select], labels[~select]),
                  top_token_hits(scope, d, words, np.asarray(store.vocab)) if words else np.zeros(d.n_latents))


def run_features_study(scope, store, *, hooks: str | list[str] = every_layer("resid_post"),
                       out: str = "results/features/dictionaries", eval_prompts: str = "toxicity",
                       label_field: str = "label", positive: str = "hostile", negative: str = "friendly",
                       target_words: list[str] | None = None,
                       control_seeds: tuple[int, ...] | list[int] = DEFAULT_SEEDS,
                       steps: int = 300, batch_size: int = 512, k: int | list[int] = 32, expansion_factor: int = 8,
                       dead_tokens: int = 20_000, seed: int = 0, dashboard_latents: int = 48,
                       hostile_latent: int | None = None, progress: Progress | None = None) -> FeatureStudy:
    """Run the recipe on `scope` (dictionaries from `store`, one per hook of `hooks` (names or glob
    patterns of the store's hooks) and per value of `k`) and on random-init controls; see the
    module docstring. Dictionaries and control stores are written under `out`. hostile_latent:
    measure the claims on this latent of the chosen dictionary instead of the one the selection
    half picks. progress: hears the hooks, the training steps and the controls as they finish
    (`analysis.progress`)."""
    out = Path(out)
    names = resolve(hooks, store.hooks, where=f"the store {store.path}")
    ks = [k] if isinstance(k, int) else list(k)
    settings = {kk: TrainSettings(steps=steps, batch_size=batch_size, k=kk, expansion_factor=expansion_factor,
                                  dead_tokens=dead_tokens, seed=seed, checkpoint_every=steps) for kk in ks}
    stored = {store.prompt_text(p) for p in range(store.n_prompts)}
    prompts = [p for p in load_prompts(eval_prompts) if p.text not in stored
               and p.metadata.get(label_field) in (positive, negative)]
    texts = [p.text for p in prompts]
    labels = np.array([p.metadata[label_field] == positive for p in prompts])
    select = selection_half([p.metadata.get("pair", i) for i, p in enumerate(prompts)], seed)
    words = set(task_value(eval_prompts, "insults", target_words, parameter="target_words"))
    grid = [(hook, kk) for hook in names for kk in ks]
    by_choice = {(hook, kk): _recipe(scope, store, hook, out / "model" / hook / f"k{kk}", settings[kk], texts, labels,
                                     select, words, progress)
                 for hook, kk in counted(grid, len(grid), "dictionaries, one per hook and k", progress)}
    hook, k_chosen = max(by_choice, key=lambda c: (by_choice[c].auroc_select.max(),
                                                   by_choice[c].separation_select[by_choice[c].best]))
    model = by_choice[hook, k_chosen]
    if hostile_latent is not None:
        if not 0 <= hostile_latent < model.dictionary.n_latents:
            raise AnalysisInputError(f"hostile_latent {hostile_latent} is not a latent of the chosen dictionary "
                                     f"({model.dictionary.n_latents} latents)")
        model.named = hostile_latent
    controls = []
    for control_scope, i in zip(random_init_scopes(scope, control_seeds, progress=progress), control_seeds):
        path = out / f"control_{i}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        dump(control_scope, store_prompts(store), [hook], str(path), seed=seed)
        controls.append(_recipe(control_scope, open_store(str(path)), hook, out / f"control_{i}", settings[k_chosen],
                                texts, labels, select, words, progress))
    recon = reconstruction_metrics(model.dictionary, store)
    ce = ce_loss_recovered(scope, model.dictionary, texts)
    dashboards = feature_dashboards(model.dictionary, store, scope=scope)
    report(progress, "reconstruction, CE loss, dashboards")
    return FeatureStudy(model=model, controls=controls, reconstruction=recon, ce=ce, dashboards=dashboards,
                        n_eval=int((~select).sum()), n_select=int(select.sum()), positive=positive,
                        selection_auroc={f"{h}, k={kk}": float(r.auroc_select.max()) for (h, kk), r in by_choice.items()},
                        k=k_chosen,
                        dashboard_latents=dashboard_latents, control_seeds=list(control_seeds))


@dataclass
class FeatureStudy(Result):
    """The study's measurements (see `run_features_study`)."""

    model: Recipe
    controls: list[Recipe]
    reconstruction: dict
    ce: dict
    dashboards: FeatureDashboards
    n_eval: int
    n_select: int
    positive: str
    selection_auroc: dict[str, float] = field(default_factory=dict)   # "hook, k=K" -> best latent's, selection half
    k: int = 32
    dashboard_latents: int = 48
    control_seeds: list[int] = field(default_factory=list)

    title = "features: a dictionary finds the hostile register"

    @property
    def auroc(self) -> Controlled:
        """The chosen latent's held-out AUROC against each control's best latent."""
        return Controlled(float(self.model.auroc_eval[self.model.chosen]),
                          [float(c.auroc_eval.max()) for c in self.controls],
                          control=f"best latent of the same recipe on random-init models (seeds {self.control_seeds})")

    @property
    def word_hits(self) -> Controlled:
        """Target words among the hostile latent's own top 10, against each control's chosen latent."""
        return Controlled(float(self.model.word_hits[self.model.chosen]),
                          [float(c.word_hits[c.chosen]) for c in self.controls],
                          control="target words in the top 10 of the chosen latent of random-init models")

    def summary(self) -> dict:
        auroc, hits = self.auroc, self.word_hits
        return round_headline({"hook": self.model.dictionary.hook,
                **{f"selection_auroc[{h}]": v for h, v in self.selection_auroc.items()},
                "k": self.k, "chosen_on": "selection half (hook, k, latent); the evaluation half chose nothing",
                "hostile_latent_named_by_caller": self.model.named is not None,
                # the latent the numbers are about, named only when its numbers clear
                "auroc_measured_on": self.model.chosen,
                "hostile_latent": self.model.chosen if auroc.clears else None,
                **auroc.headline("hostile_latent_auroc"), **hits.headline("hostile_latent_insult_words_in_top10"),
                # exploration, not a claim: the latent of the dictionary with most target words
                "most_target_words_at": self.model.word_latent,
                "most_target_words_in_top10": int(self.model.word_hits.max()),
                "fvu": self.reconstruction["fvu"],
                "l0": self.reconstruction["l0"], "dead_share": self.reconstruction["dead_share"],
                "dense_share": self.reconstruction["dense_share"], **self.ce,
                "eval_prompts": self.n_eval, "selection_prompts": self.n_select,
                "tokens_per_s": self.model.dictionary.provenance.get("tokens_per_s_this_run")})

    def findings(self) -> list[str]:
        """The hostile latent's AUROC and insult words in words, with their verdicts."""
        numbers = self.summary()
        named = "named by the caller" if self.model.named is not None else "chosen on the selection half"
        return [sentence(numbers, "hostile_latent_auroc",
                         f"latent {self.model.chosen} of the {numbers['hook']} dictionary (k={self.k}; {named}) tells "
                         f"held-out hostile from friendly prompts (the half that chose nothing) with AUROC"),
                sentence(numbers, "hostile_latent_insult_words_in_top10",
                         "the insult words among its top 10 unembedded tokens number")]

    def to_frame(self) -> pd.DataFrame:
        frame = self.dashboards.to_frame()
        frame.insert(1, "auroc_select", self.model.auroc_select)
        frame.insert(2, "auroc_eval", self.model.auroc_eval)
        frame.insert(3, "target_words_in_top10", self.model.word_hits)
        return frame

    def figures(self) -> list[go.Figure]:
        """Held-out AUROC of every latent, organism against controls; the latents' firing density."""
        fig = go.Figure()
        fig.add_histogram(x=self.model.auroc_eval, name="organism latents", opacity=0.7, nbinsx=50)
        fig.add_histogram(x=np.concatenate([c.auroc_eval for c in self.controls]), name="random-init latents",
                          opacity=0.7, nbinsx=50)
        fig.add_vline(x=self.auroc.value, line_dash="dash", annotation_text=f"latent {self.model.chosen}")
        fig.update_layout(barmode="overlay", title=f"Held-out AUROC for '{self.positive}' of every latent",
                          xaxis_title="AUROC (evaluation half)", yaxis_title="latents")
        return [fig, *self.dashboards.figures()]

    def report_html(self) -> str:
        """Dashboards of the hostile latent and of the latent with most target words, then the most
        frequently firing latents."""
        named = {self.model.chosen: f"hostile latent (AUROC {self.auroc.value:.3f}, "
                                    f"{int(self.word_hits.value)}/10 target words)"}
        named.setdefault(self.model.word_latent, f"most target words of any latent ({int(self.model.word_hits.max())}/10)")
        others = [i for i in torch.argsort(-self.dashboards.density).tolist() if i not in named]
        return self.dashboards.to_html(list(named) + others[:self.dashboard_latents], notes=named)
