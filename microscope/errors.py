"""Errors raised by OPT Microscope. Every error derives from `MicroscopeError`."""

from __future__ import annotations


class MicroscopeError(Exception):
    """Base class of every error this package raises on purpose."""


# --- models (loading, family registry) ---

class ModelNotFoundError(MicroscopeError, FileNotFoundError):
    """A model source could not be found locally (nothing is ever downloaded at run time)."""


class UnknownSizeError(MicroscopeError, ValueError):
    """A family size name that is not one of the nine OPT sizes."""


class UnsupportedModelError(MicroscopeError, ValueError):
    """A checkpoint or object that is not an OPT model, or a source/option combination not supported."""


# --- activation store and dump job ---

class StoreError(MicroscopeError, ValueError):
    """An activation store that cannot be created, opened or read as asked."""


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


# --- hooks (hook points, run_with_cache, interventions, generation) ---

class UnknownHookError(MicroscopeError, KeyError):
    """A hook name or pattern that matches no hook point (the message lists close matches)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class HookError(MicroscopeError, ValueError):
    """A hook function that returned something the model cannot use (wrong shape or type)."""


class TokenizerMissingError(MicroscopeError, ValueError):
    """Text prompts given to a Scope that has no tokenizer (pass token ids instead)."""


# --- scale (converter, planner) ---


class MetaseqCheckpointError(MicroscopeError, ValueError):
    """A metaseq checkpoint that cannot be converted as it is: raw FSDP shards, unknown keys, or
    model-parallel parts that disagree with each other."""


# --- analysis ---

class AnalysisInputError(MicroscopeError, ValueError):
    """Inputs to an analysis tool that cannot be used as given (shapes, tokens, positions, layouts)."""


# --- workbench (experiments, reports) ---

class ExperimentSpecError(MicroscopeError, ValueError):
    """An experiment spec (experiments/*.toml) that is malformed: names the file, the key and the fix."""
