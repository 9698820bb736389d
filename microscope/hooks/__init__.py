"""Hook points on HF OPT modules, the activation cache, interventions and generation capture."""

from microscope.hooks.cache import ActivationCache
from microscope.hooks.hook_points import HookPoint, OPTHookPoints
from microscope.hooks.interventions import ablate_heads, ablate_neurons, add_vector, patch_from, token_mean

__all__ = ["ActivationCache", "HookPoint", "OPTHookPoints", "ablate_heads", "ablate_neurons",
           "add_vector", "patch_from", "token_mean"]
