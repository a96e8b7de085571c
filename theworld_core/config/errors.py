"""One error format for every config source: `<key path>: <value> is not allowed: <what is allowed>`.

- `StrictModel`: the base of every config model (unknown keys are errors).
- `ConfigError`: a config that cannot be used, listing every problem at once.
- `format_validation_error`, `describe_error`: pydantic errors -> problem lines.
- `suggest_key`: did-you-mean for misspelt or abbreviated keys and values.
- `is_secret_key`, `clean_config_data`: credentials are refused and their values never shown.
- `validate_config`: validate parsed data as a model, raising `ConfigError`.
- `read_config_file`: the text of a config file, or a `ConfigError` naming it.

This module is the leaf of the package: it imports no other config module.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


class StrictModel(BaseModel):
    """Unknown keys are errors, never silently ignored (the reference implementation's mistake)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config that cannot be used. `problems` holds one line per problem, each
    `<key path>: <value> is not allowed: <what is allowed>` (or `<key path>: unknown key; ...`);
    `source` is the file (or other origin); `line`/`column` are set for syntax errors."""

    def __init__(
        self, problems: list[str], source: str | None = None, *, line: int | None = None, column: int | None = None
    ):
        self.problems = list(problems)
        self.source = source
        self.line = line
        self.column = column
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.source or "config"
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        if len(self.problems) == 1:
            return f"{where}: {self.problems[0]}"
        lines = [f"{where}: {len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def cross_field_error(title: str, problems: list[tuple[str, Any, str]]) -> ValidationError:
    """A `ValidationError` of `cross_field` errors `(key, value, allowed)`, for checks that involve
    more than one field; `format_validation_error` renders each as `<key>: <value> is not allowed: <allowed>`."""
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(
                type=PydanticCustomError("cross_field", "{allowed}", {"allowed": allowed}), loc=(key,), input=value
            )
            for key, value, allowed in problems
        ],
    )


# --- secrets --------------------------------------------------------------------------------------

_SECRET_KEY = re.compile(r"(^|_)(token|api_key|apikey|secret|password|passwd)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{8,})")


def is_secret_key(key: str) -> bool:
    """Whether a config key names a credential (`hf_token`, `token`, `wandb_api_key`, ...)."""
    return bool(_SECRET_KEY.search(key))


def secret_problem(path: str, key: str) -> str:
    """The problem line for a credential written into a config file (its value is never shown)."""
    env = "HF_TOKEN" if "token" in key.lower() and "mlflow" not in key.lower() else "the matching environment variable"
    return (
        f"{path}: secrets are not allowed in config files (configs are logged with the run); "
        f"remove it and set {env} in the environment instead"
    )


def clean_config_data(data: Any, path: str, secrets: list[str]) -> Any:
    """`data` without keys starting with `_` (e.g. `"_comment"`) and without secret-looking
    keys, at every level of nesting; each secret adds a problem line to `secrets`."""
    if isinstance(data, Mapping):
        out = {}
        for key, value in data.items():
            if isinstance(key, str) and key.startswith("_"):
                continue
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and is_secret_key(key):
                secrets.append(secret_problem(sub, key))
                continue
            out[key] = clean_config_data(value, sub, secrets)
        return out
    if isinstance(data, list):
        return [clean_config_data(v, f"{path}[{i}]", secrets) for i, v in enumerate(data)]
    return data


# --- key suggestions ------------------------------------------------------------------------------

RETIRED_SEED_KEYS: dict[str, str] = {
    "load_full_cosmos_pipeline": "only the Cosmos VAE encoder is ever loaded (AutoencoderKLWan, subfolder 'vae')",
    "log_to_tensorboard": "metrics are logged to MLflow",
    "save_safetensors": "checkpoints are always written as safetensors",
    "device": "the device is chosen at launch (CUDA when present, else CPU)",
}
"""Keys of the original trainer's `TrainingConfig` that this package deliberately does not have, and
why (docs/configuration.md#stage-json-files)."""

# Common abbreviations; difflib alone does not find these.
_ALIASES: dict[str, str] = {
    "lr": "learning_rate",
    "epochs": "num_epochs",
    "num_train_epochs": "num_epochs",
    "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps",
    "per_device_train_batch_size": "batch_size",
    "warmup": "warmup_steps",
    "lr_scheduler_type": "lr_scheduler",
    "scheduler": "lr_scheduler",
    "gradient_checkpointing": "use_gradient_checkpointing",
    "fp16": "mixed_precision",
    "bf16": "mixed_precision",
    "resume_from": "resume_from_checkpoint",
    "max_train_steps": "max_steps",
}


def _initials(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part)


def suggest_key(key: str, allowed: list[str] | tuple[str, ...]) -> str | None:
    """The allowed key a misspelt or abbreviated `key` most likely meant (None when nothing is close)."""
    allowed = list(allowed)
    low = key.lower()
    if _ALIASES.get(low) in allowed:
        return _ALIASES[low]
    close = difflib.get_close_matches(low, allowed, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_initials = [a for a in allowed if len(low) >= 2 and _initials(a) == low]
    if len(by_initials) == 1:
        return by_initials[0]
    containing = [a for a in allowed if len(low) >= 4 and (low in a or a in low)]
    if len(containing) == 1:
        return containing[0]
    return None


def unknown_key_problem(path: str, key: str, allowed: list[str] | tuple[str, ...] | None, otherwise: str) -> str:
    """The problem line for an unknown `key`: a secret, a retired key of the original trainer, a likely
    typo, or `otherwise`."""
    if is_secret_key(key):
        return secret_problem(path, key)
    if key in RETIRED_SEED_KEYS:
        return f"{path}: unknown key; the original trainer's {key!r} is not used here: {RETIRED_SEED_KEYS[key]}"
    hint = suggest_key(key, allowed) if allowed else None
    return f"{path}: unknown key; did you mean {hint!r}?" if hint else f"{path}: unknown key ({otherwise})"


# --- rendering pydantic errors ----------------------------------------------------------------------


def render_value(value: Any) -> str:
    """A value as a problem line shows it: JSON spelling of null/booleans, token-like text redacted, cut at 80."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    text = _SECRET_VALUE.sub("hf_***", text)
    return text if len(text) <= 80 else text[:77] + "..."


def join_path(prefix: str, loc: tuple[Any, ...]) -> str:
    """`prefix` and a pydantic location as a key path: `stages[2].learning_rate`."""
    path = prefix.rstrip(".")
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path or "(top level)"


def errors_of(exc: ValidationError) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """`(location, error)` of each error; a wrong dict key (`learning_rates.gemma_vison`) is located
    at the dict, since the key itself is the bad value."""
    for error in exc.errors(include_url=False):
        loc = tuple(error.get("loc", ()))
        if loc and loc[-1] == "[key]":
            loc = loc[:-1]
        yield loc, error


def _field_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _field_model(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the (nested) model that holds the key at `loc` (None when unknown)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        current = _field_model(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else None


_BOUNDS = {
    "greater_than": ("greater than", "gt"),
    "greater_than_equal": ("greater than or equal to", "ge"),
    "less_than": ("less than", "lt"),
    "less_than_equal": ("less than or equal to", "le"),
}
_ALLOWED_BY_TYPE = {
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping of keys to values (a JSON object)",
    "model_type": "must be a mapping of keys to values (a JSON object)",
    "model_attributes_type": "must be a mapping of keys to values (a JSON object)",
}


def _what_is_allowed(error: dict[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        allowed = (
            "must be one of " + ", ".join(repr(c) for c in choices) if choices else f"must be {ctx.get('expected')}"
        )
        if isinstance(value, str) and choices:
            hint = suggest_key(value, choices)
            if hint:
                allowed += f"; did you mean {hint!r}?"
        return allowed
    if kind in _BOUNDS:
        words, name = _BOUNDS[kind]
        bound = ctx.get(name)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {words} {bound}"
    if kind in _ALLOWED_BY_TYPE:
        return _ALLOWED_BY_TYPE[kind]
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if kind == "cross_field":
        return str(ctx.get("allowed", error["msg"]))
    return str(error["msg"]).replace("Input should be", "must be")


def describe_error(error: dict[str, Any], loc: tuple[Any, ...], model: type[BaseModel] | None, path: str) -> str:
    """One pydantic error as a problem line at key path `path` (`model` is used to suggest keys)."""
    key = loc[-1] if loc and isinstance(loc[-1], str) else None
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc) if model is not None else None
        if key is None:
            return f"{path}: unknown key (not a field of this config)"
        return unknown_key_problem(path, key, allowed, "not a field of this config")
    if error["type"] == "missing":
        return f"{path}: required but missing"
    value_text = "<hidden>" if key is not None and is_secret_key(key) else render_value(error.get("input"))
    return f"{path}: {value_text} is not allowed: {_what_is_allowed(error)}"


def _strict_model_named(name: str) -> type[BaseModel] | None:
    """The config model class called `name` (a `ValidationError`'s title), for key suggestions."""
    pending: list[type[BaseModel]] = [StrictModel]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def format_validation_error(
    exc: ValidationError, source: str | None = None, prefix: str = "", model: type[BaseModel] | None = None
) -> list[str]:
    """Turn a pydantic `ValidationError` into problem lines, one per error:
    `<key path>: <value> is not allowed: <what is allowed>`, or for unknown keys
    `<key path>: unknown key; did you mean '<field>'?`.

    `prefix` is prepended to every key path (e.g. `stages[2]` gives `stages[2].learning_rate`);
    `model` is the class that was validated (default: the config model named by the error), used to
    suggest field names. Values of secret-looking keys are never shown. `source` is accepted so
    callers can pass the file name through; wrap the result as `ConfigError(problems, source)`.
    """
    del source  # the file name belongs to the ConfigError, not to each line
    if model is None:
        model = _strict_model_named(exc.title)
    return [describe_error(error, loc, model, join_path(prefix, loc)) for loc, error in errors_of(exc)]


M = TypeVar("M", bound=BaseModel)


def validate_config(model: type[M], data: Any, source: str | None = None, prefix: str = "") -> M:
    """Validate `data` (a parsed mapping) as `model`, raising `ConfigError` listing every problem.

    Secret-looking keys are refused before validation, and keys starting with `_` are dropped, at
    every level of nesting. Reusable for any config source (`prefix` as in `format_validation_error`).
    Prefer it to calling `model_validate` on a parent model directly: a parent without
    `hide_input_in_errors=True` would print a secret's value in its raw `ValidationError`.
    """
    secrets: list[str] = []
    cleaned = clean_config_data(data, prefix.rstrip("."), secrets)
    try:
        result = model.model_validate(cleaned)
    except ValidationError as exc:
        problems = format_validation_error(exc, source, prefix, model)
        raise ConfigError(secrets + problems, source) from None
    if secrets:
        raise ConfigError(secrets, source)
    return result


def read_config_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(source name, text) of a config file; an unreadable file is a `ConfigError` naming it."""
    source = os.fspath(path)
    try:
        return source, Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["file not found"], source) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], source) from None
