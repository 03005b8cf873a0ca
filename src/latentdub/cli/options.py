"""The dub-option flags of ``dub`` and ``batch``, built from the fields of :class:`DubOptions`.

One flag per field: ``--field-name`` (``--x/--no-x`` for a bool), the field's type, default
and description (the help text); a ``Literal`` field shows its choices; a field marked
:class:`~latentdub.options.FromFile` takes a FILE, read by the field's own loader. A field added to
``DubOptions``, or to a subclass given to :func:`with_option_flags`, becomes a flag with no
other edit. The values are checked by the options class itself (one place for the rules and
their messages); an :class:`OptionError` becomes an :class:`InputError` that names the flag.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic_core import PydanticUndefined

from latentdub.errors import InputError
from latentdub.options import DubOptions, OptionError, file_option, read_option_files

OPTIONS_PANEL = "Dub options"
# The wrapper's own click context parameter; a name no options field can take.
_CONTEXT = "latentdub_click_context"
_R = TypeVar("_R")


def option_flag(name: str) -> str:
    """``length_policy`` → ``--length-policy``."""
    return "--" + name.replace("_", "-")


def dub_option_params(options_cls: type[DubOptions] = DubOptions, *, panel: str = OPTIONS_PANEL) -> list[inspect.Parameter]:
    """One keyword-only typer option parameter per field of ``options_cls``, named as the field.

    The help panel is ``panel``; each option's help is the field's description.
    """
    params: list[inspect.Parameter] = []
    for name, info in options_cls.model_fields.items():
        kind, choices = _flag_type(info.annotation)
        from_file = file_option(options_cls, name) is not None
        if from_file:  # the value is read from the file by the field's loader (options_from_flags)
            kind, choices = Path, ()
        default = info.get_default(call_default_factory=True)
        required = default is PydanticUndefined
        flag = option_flag(name)
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(
            *decls, help=_help(info.description or "", choices),
            metavar="<choice>" if choices else ("FILE" if from_file else None),
            rich_help_panel=panel, show_default=not required,
        )
        annotation = Annotated[kind | None, option] if required else Annotated[kind, option]
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None if required else default,
        ))
    return params


def _flag_type(annotation: Any) -> tuple[type, tuple[str, ...]]:
    """The type click parses a field's flag as, and the choices of a ``Literal`` (else none).

    A ``Literal`` is parsed as text: the options class checks it, so the message (and its
    leniency, e.g. ``preset`` in any case) is the same for the CLI, the API and a manifest.
    """
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else str
    if get_origin(annotation) is Literal:
        return str, tuple(str(c) for c in get_args(annotation))
    if annotation in (bool, int, float, str):
        return annotation, ()
    return str, ()  # anything else as text: the options class converts and checks it


def _help(description: str, choices: tuple[str, ...]) -> str:
    """The field's description, and its choices when the description does not name them all."""
    named = set(re.split(r"[^\w+]+", description))
    if not choices or named.issuperset(choices):
        return description
    return f"{description} Choices: {', '.join(choices)}.".strip()


def options_from_flags(options_cls: type[DubOptions], given: Mapping[str, Any]) -> DubOptions:
    """``options_cls(**given)``, the files of file options read first; a bad value is an
    :class:`InputError` naming its flag."""
    try:
        return options_cls(**read_option_files(options_cls, given))
    except OptionError as err:
        raise InputError(f"{option_flag(err.field)} {err.reason}") from None


def with_option_flags(
    options_cls: type[DubOptions] = DubOptions, *, panel: str = OPTIONS_PANEL
) -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """Give a typer command function a flag for every field of ``options_cls``.

    The function takes a keyword argument ``options``: an ``options_cls`` made from the flags
    given on the command line only, so the class's own defaults and rules apply to the rest
    (``steps`` follows ``sampler`` when it is not given).
    """
    flags = dub_option_params(options_cls, panel=panel)
    names = [p.name for p in flags]

    def decorate(func: Callable[..., _R]) -> Callable[..., _R]:
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "options"]
        clash = {p.name for p in own} & {*names, _CONTEXT}
        if clash:
            raise TypeError(f"{func.__name__}: option field(s) {', '.join(sorted(clash))} clash with the command's own flags")

        @functools.wraps(func)
        def command(**kwargs: Any) -> _R:
            ctx = kwargs.pop(_CONTEXT)
            values = {name: kwargs.pop(name) for name in names}
            given = {name: value for name, value in values.items() if _from_command_line(ctx, name)}
            return func(**kwargs, options=options_from_flags(options_cls, given))

        context = inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + flags + [context]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def _from_command_line(ctx: Any, name: str) -> bool:
    """Whether the user gave ``name`` (a flag or its environment variable), not its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
