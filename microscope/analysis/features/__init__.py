"""Features: sparse dictionaries (TopK SAEs, transcoders) trained from activation stores, spliced
back into the model, and shown as dashboards.

    from microscope.analysis.features import train_dictionary, splice_hooks, feature_dashboards
    d = train_dictionary("activations/demo.zarr", "blocks.1.hook_resid_post", "results/dict")
    with scope.hooks(splice_hooks(d)): logits = scope.run(prompts)
    dash = feature_dashboards(d, ms.open_store("activations/demo.zarr"), scope=scope)

Modules: coder (sparsify's model and files), feed (store batches), train (the loop), splice (hook
functions), metrics (FVU, L0, dead/dense, CE loss recovered), dashboards, study (the organism's
hostile-register features with their random-init control).
"""

from microscope.analysis.features.coder import Dictionary, load_dictionary
from microscope.analysis.features.dashboards import FeatureDashboards, feature_dashboards
from microscope.analysis.features.metrics import ce_loss_recovered, reconstruction_metrics
from microscope.analysis.features.splice import splice_hooks
from microscope.analysis.features.train import TrainSettings, train_dictionary

__all__ = ["Dictionary", "load_dictionary", "FeatureDashboards", "feature_dashboards", "ce_loss_recovered",
           "reconstruction_metrics", "splice_hooks", "TrainSettings", "train_dictionary"]
