"""Exception types that read well in ComfyUI's queue history and "Show Report".

ComfyUI names a failed node's exception `type(e).__module__ + "." + type(e).__qualname__`. ComfyUI
imports a custom node pack from its folder path, so a plain class here would be reported as
`/home/.../custom_nodes/comfyui-storydiffusion.story.parse.StoryError`. Every exception class of
the pack therefore reports its module as `StoryDiffusion`: users read `StoryDiffusion.StoryError`.

Two ways to get that, both plain Python:

    class BankError(StoryDiffusionError):     # a ValueError, as the nodes expect
        ...

    @pack_error                                # any other base class (RuntimeError, OSError, ...)
    class PatchError(RuntimeError):
        ...

Subclasses of a pack error report as `StoryDiffusion.<Name>` too. The module name is only a label:
instances of these classes are not meant to be pickled (nothing in ComfyUI pickles exceptions).
"""
from __future__ import annotations

REPORTED_MODULE = "StoryDiffusion"


def _label(cls: type) -> None:
    cls.__module__ = REPORTED_MODULE
    cls.__qualname__ = cls.__name__  # a class defined inside a function or class still reads StoryDiffusion.<Name>


def pack_error(cls: type) -> type:
    """Class decorator: ComfyUI reports `cls` (an exception class) as `StoryDiffusion.<Name>`."""
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise TypeError(f"pack_error decorates exception classes, got {cls!r}")
    _label(cls)
    return cls


@pack_error
class StoryDiffusionError(ValueError):
    """Base of the pack's user-facing errors: a ValueError whose message says what to do.
    It and every subclass report as `StoryDiffusion.<Name>`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _label(cls)


def load_failure_reason(exc: BaseException, limit: int = 200) -> str:
    """Why torch.load / safetensors could not read a weight file, short enough for a message.

    When `torch.load(..., weights_only=True)` refuses a file, PyTorch's text advises re-loading it
    with `weights_only=False`, which runs whatever code the file holds: that text is never passed on.
    Raise the caller's own error `from None` as well, or ComfyUI's logged traceback shows the original.
    """
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if "weights_only" in lowered or "weights only" in lowered:
        return (f"{type(exc).__name__}: it holds something other than plain tensors, or is not a PyTorch "
                f"file at all")
    if len(text) > limit:
        text = text[:limit].rstrip() + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
