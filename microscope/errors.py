"""Errors raised by OPT Microscope. Every error derives from `MicroscopeError`."""

from __future__ import annotations


class MicroscopeError(Exception):
    """Base class of every error this package raises on purpose."""


class UnknownSettingError(MicroscopeError, TypeError):
    """A keyword that names no setting of a dump or training job (the message lists the settings)."""


# --- models (loading, family registry) ---

class ModelNotFoundError(MicroscopeError, FileNotFoundError):
    """A model source could not be found locally (nothing is ever downloaded at run time)."""


class UnknownSizeError(MicroscopeError, ValueError):
    """A family size name that is not one of the nine OPT sizes."""


class UnsupportedModelError(MicroscopeError, ValueError):
    """A checkpoint or object that is not an OPT model, or a source/option combination not supported."""


class CheckpointCorruptError(MicroscopeError, ValueError):
    """A weights file that is truncated or unreadable, or a shard its index names that is missing."""


# --- activation store and dump job ---

class StoreError(MicroscopeError, ValueError):
    """An activation store that cannot be created, written, opened or read as asked."""


class StoreIndexError(StoreError, IndexError):
    """A prompt or row index outside the store (the message gives the store's size)."""


class StoreMismatchError(StoreError):
    """A resume against a store made with another model, hook set, dtype, positions or prompts."""


class StoreCorruptError(StoreError):
    """A chunk whose checksum does not match: names the hook and the work unit."""


class UnitNotCommittedError(StoreError):
    """A read touching a work unit the dump has not committed yet."""


class DiskFullError(MicroscopeError, OSError):
    """The store ran out of space; units committed before stay readable."""


class Fp16OverflowError(MicroscopeError, ValueError):
    """An activation outside the float16 range that would otherwise be stored as inf."""


class PromptError(MicroscopeError, ValueError):
    """A prompt file or prompt that cannot be used (empty, too long, malformed)."""


class PromptSetNotFoundError(PromptError, FileNotFoundError):
    """A named prompt set that has no file (the message lists the known sets)."""


# --- hooks (hook points, run_with_cache, interventions, generation) ---

class UnknownHookError(MicroscopeError, KeyError):
    """A hook name or pattern that matches no hook point (the message lists close matches)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class HookError(MicroscopeError, ValueError):
    """A hook function that returned something the model cannot use (wrong shape or type), or a
    cache asked for what it cannot compute."""


class TokenizerMissingError(MicroscopeError, ValueError):
    """Text prompts given to a Scope that has no tokenizer (pass token ids instead)."""


# --- scale (converter, planner) ---

class BudgetInputError(MicroscopeError, ValueError):
    """Inputs a dump budget cannot be estimated from (dtype, positions, counts, GPU memory)."""


class MetaseqCheckpointError(MicroscopeError, ValueError):
    """A metaseq checkpoint that cannot be converted as it is: raw FSDP shards, unknown keys, or
    model-parallel parts that disagree with each other."""


class TrainingError(MicroscopeError, ValueError):
    """An organism training run that cannot start as asked (a checkpoint of another run's shape)."""


# --- analysis ---

class AnalysisInputError(MicroscopeError, ValueError):
    """Inputs to an analysis tool that cannot be used as given (shapes, tokens, positions, layouts)."""


# --- workbench (experiments, reports) ---

class ExperimentSpecError(MicroscopeError, ValueError):
    """An experiment spec (experiments/*.toml) that is malformed: names the file, the key and the fix."""
