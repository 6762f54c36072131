"""Command options as frozen pydantic models: one field per option, its description the help text.

Every command's options are one model (``ConvertOptions``, ``EvalOptions``, ...), declared beside
the library function that takes it; ``relufy.cli`` builds each command's flags from the model's
fields, so a field is the option's only declaration. Conventions a field follows:

- the flag is ``--field-name`` (``flag=`` in ``option_field`` overrides it, e.g. ``--json``);
- a bool defaulting to False is a plain flag (``--force``), one defaulting to True a
  ``--x/--no-x`` pair;
- a ``Literal`` is a choice; a tuple is given comma-separated on the command line (``0,0.5,0.9``).
"""

from __future__ import annotations

from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RelufyError


class Options(BaseModel):
    """Base of every command's options: frozen, unknown fields refused, numbers finite."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _comma_separated(cls, value, info):
        """``"a,b,c"`` for a tuple field (as typed on a command line) becomes ``("a", "b", "c")``."""
        if isinstance(value, str) and is_tuple(cls.model_fields[info.field_name].annotation):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @classmethod
    def build(cls, **values: Any):
        """The options from keyword values; a bad value becomes one line naming its flag."""
        try:
            return cls(**values)
        except ValidationError as e:
            loc, msg = first_error(e)
            name = loc[0] if loc else ""
            where = flag_of(cls, name) if name in cls.model_fields else "options"
            raise RelufyError(f"{where}: {msg}") from None


def first_error(e: ValidationError) -> tuple[list[str], str]:
    """Where (the field path) and what of a validation error's first problem, for one line."""
    err = e.errors()[0]
    return [str(p) for p in err["loc"]], err["msg"].removeprefix("Value error, ")


def option_field(default: Any = ..., *, description: str, flag: str | None = None, **kwargs) -> Any:
    """``pydantic.Field`` with the command-line flag, when it is not ``--field-name``."""
    extra = {"flag": flag} if flag else None
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def is_tuple(annotation) -> bool:
    """``tuple[...]``, or an optional one."""
    if get_origin(annotation) in (Union, UnionType):
        return any(is_tuple(a) for a in get_args(annotation))
    return get_origin(annotation) is tuple


def flag_of(cls: type[BaseModel], name: str) -> str:
    extra = cls.model_fields[name].json_schema_extra or {}
    return extra.get("flag") or "--" + name.replace("_", "-")
