"""The pipeline file (`stages.yaml`) as written: YAML with duplicate-key detection, and profiles.

`load_pipeline_config(path, profile)` reads the file, validates the base and every profile (an
overlay deep-merged onto the file before the stages are layered), and reports every problem at
once, each with the key path where the bad value was written (`profiles.<name>.<...>` for values a
profile wrote).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from theworld_core.config.errors import (
    ConfigError,
    clean_config_data,
    join_path,
    read_config_file,
    render_value,
    suggest_key,
)
from theworld_core.config.pipeline_schema import (
    PIPELINE_KEYS,
    PROFILE_KEYS,
    PipelineConfig,
    build_pipeline,
    where_plain,
)
from theworld_core.config.stage_schema import STAGE_NAME_PATTERN


class _Yaml12Loader(yaml.SafeLoader):
    """A safe YAML loader with YAML 1.2 scalars: only true/false are booleans (`no` stays the string
    'no', as `mixed_precision: no` needs) and `1e-4` is a number (YAML 1.1 reads it as a string)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _duplicate_keys(node: Any) -> list[str]:
    """Keys written twice in one mapping (YAML loaders silently keep the last), with their paths."""
    problems: list[str] = []
    seen_nodes: set[int] = set()

    def walk(current: Any, loc: tuple[Any, ...]) -> None:
        if id(current) in seen_nodes:
            return
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, value_node in current.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = key_node.value
                    line = key_node.start_mark.line + 1
                    if key in lines:
                        problems.append(
                            f"{join_path('', loc + (key,))}: duplicate key: written on lines {lines[key]} and {line} "
                            "(YAML would silently keep the last)"
                        )
                    else:
                        lines[key] = line
                    walk(value_node, loc + (key,))
                else:
                    walk(value_node, loc)
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                walk(item, loc + (index,))

    walk(node, ())
    return problems


def parse_pipeline_yaml(text: str, source: str | None = None) -> Any:
    """Parse a pipeline file's YAML (YAML 1.2 booleans and floats, one document). Syntax errors raise
    `ConfigError` with line and column; duplicate keys raise `ConfigError` naming their paths."""
    loader = _Yaml12Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicates = _duplicate_keys(node)
        if duplicates:
            raise ConfigError(duplicates, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = exc.problem or exc.context or "syntax error"
        if exc.problem and exc.context:
            where = f", line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
            detail = f"{exc.problem} ({exc.context}{where})"
        raise ConfigError(
            [f"invalid YAML: {detail}"],
            source,
            line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], source) from None
    finally:
        loader.dispose()


# --- profiles -----------------------------------------------------------------------------------


def _deep_merge(
    base: Mapping[str, Any],
    overlay: Mapping[str, Any],
    at: tuple[Any, ...],
    origin: tuple[Any, ...],
    origins: dict[tuple[Any, ...], tuple[Any, ...]],
) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value, at + (key,), origin + (key,), origins)
        else:
            merged[key] = copy.deepcopy(value)
            origins[at + (key,)] = origin + (key,)
    return merged


def _apply_profile(
    base: Mapping[str, Any], name: str, overlay: Mapping[str, Any], stage_index: Mapping[str, int]
) -> tuple[dict[str, Any], dict[tuple[Any, ...], tuple[Any, ...]]]:
    """The document with profile `name` deep-merged in, and where each overlaid value was written."""
    document = copy.deepcopy(dict(base))
    origins: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for key, value in overlay.items():
        origin = ("profiles", name, key)
        if key == "stages":
            for stage_name, changes in (value or {}).items():
                index = stage_index[stage_name]
                document["stages"][index] = _deep_merge(
                    document["stages"][index], changes or {}, ("stages", index), origin + (stage_name,), origins
                )
        elif isinstance(value, Mapping) and isinstance(document.get(key), Mapping):
            document[key] = _deep_merge(document[key], value, (key,), origin, origins)
        else:
            document[key] = copy.deepcopy(value)
            origins[(key,)] = origin
    return document, origins


def _check_profiles(raw: Any, stage_index: Mapping[str, int] | None, problems: list[str]) -> dict[str, dict[str, Any]]:
    """The profile overlays by name, each with its structurally bad parts (unknown keys, unknown
    stages) listed in `problems` and left out, so the rest of it is still checked."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(f"profiles: {render_value(raw)} is not allowed: must be a mapping of profile names to overlays")
        return {}
    good: dict[str, dict[str, Any]] = {}
    for name, overlay in raw.items():
        at = f"profiles.{name}"
        if not isinstance(name, str) or not STAGE_NAME_PATTERN.match(name):
            problems.append(
                f"{at}: {render_value(name)} is not allowed: a profile name uses only letters, digits, '_', '-' and '.'"
            )
            continue
        if overlay is None:
            overlay = {}
        if not isinstance(overlay, Mapping):
            problems.append(
                f"{at}: {render_value(overlay)} is not allowed: must be a mapping with the keys of the file ({', '.join(PROFILE_KEYS)})"
            )
            continue
        kept: dict[str, Any] = {}
        for key, value in overlay.items():
            if key not in PROFILE_KEYS:
                hint = suggest_key(str(key), PROFILE_KEYS)
                problems.append(
                    f"{at}.{key}: unknown key"
                    + (f"; did you mean {hint!r}?" if hint else f" (a profile may set {', '.join(PROFILE_KEYS)})")
                )
            elif key != "stages":
                kept[key] = value
            elif value is None:
                continue
            elif not isinstance(value, Mapping):
                problems.append(
                    f"{at}.stages: {render_value(value)} is not allowed: must be a mapping of stage names to the keys to change"
                )
            elif stage_index is not None:
                kept_stages: dict[str, Any] = {}
                for stage_name, changes in value.items():
                    where = f"{at}.stages.{stage_name}"
                    if stage_name not in stage_index:
                        hint = suggest_key(str(stage_name), list(stage_index))
                        known = ", ".join(repr(s) for s in stage_index)
                        problems.append(
                            f"{where}: unknown stage"
                            + (f"; did you mean {hint!r}?" if hint else f"; the stages are {known}")
                        )
                    elif changes is not None and not isinstance(changes, Mapping):
                        problems.append(
                            f"{where}: {render_value(changes)} is not allowed: must be a mapping of keys to change"
                        )
                    elif isinstance(changes, Mapping) and "name" in changes and changes["name"] != stage_name:
                        problems.append(
                            f"{where}.name: {render_value(changes['name'])} is not allowed: a profile cannot rename a stage"
                        )
                    else:
                        kept_stages[stage_name] = changes or {}
                kept["stages"] = kept_stages
        good[name] = kept
    return good


def _where_mapped(origins: dict[tuple[Any, ...], tuple[Any, ...]]) -> Callable[[tuple[Any, ...]], str]:
    """A key-path renderer that shows, for values a profile wrote, where the profile wrote them."""

    def where(loc: tuple[Any, ...]) -> str:
        for cut in range(len(loc), 0, -1):
            origin = origins.get(loc[:cut])
            if origin is not None:
                return join_path("", origin + loc[cut:])
        return join_path("", loc)

    return where


def load_pipeline_config(path: str | os.PathLike[str], profile: str | None = None) -> PipelineConfig:
    """Read a pipeline file (`stages.yaml`) and apply `profile` (one of its `profiles`).

    The base file and every profile in it are validated whichever profile is asked for, so a bad
    file is refused before anything runs; every problem is listed at once in one `ConfigError`
    naming the file, each as `<key path>: <value> is not allowed: <what is allowed>` (paths into a
    profile read `profiles.<name>.<...>`; a problem that only a profile brings out ends with
    `(with profile '<name>')`). Secrets are refused and their values never shown.
    """
    source, text = read_config_file(path)
    raw = parse_pipeline_yaml(text, source)
    if raw is None:
        raise ConfigError(["the file is empty: a pipeline file is a YAML mapping with at least a stages list"], source)
    if not isinstance(raw, Mapping):
        raise ConfigError(
            [
                f"(top level): {render_value(raw)} is not allowed: must be a YAML mapping of the keys {', '.join(PIPELINE_KEYS)}"
            ],
            source,
        )

    problems: list[str] = []
    document = clean_config_data(raw, "", problems)  # secrets refused (values never shown), `_` keys dropped
    for key in list(document):
        if key not in PIPELINE_KEYS:
            hint = suggest_key(str(key), PIPELINE_KEYS)
            problems.append(
                f"{key}: unknown key"
                + (f"; did you mean {hint!r}?" if hint else f" (the keys are {', '.join(PIPELINE_KEYS)})")
            )
            del document[key]

    base = {k: v for k, v in document.items() if k != "profiles"}
    stages = base.get("stages")
    stage_index: dict[str, int] | None = None
    if isinstance(stages, list) and all(isinstance(s, Mapping) and isinstance(s.get("name"), str) for s in stages):
        stage_index = {}
        for index, entry in enumerate(stages):
            stage_index.setdefault(entry["name"], index)
    overlays = _check_profiles(document.get("profiles"), stage_index, problems)

    config, base_problems = build_pipeline(base, where_plain)
    problems += base_problems
    configs: dict[str, PipelineConfig | None] = {}
    if stage_index is not None:
        known = set(base_problems)
        for name, overlay in overlays.items():
            merged, origins = _apply_profile(base, name, overlay, stage_index)
            configs[name], found = build_pipeline(merged, _where_mapped(origins))
            problems += [
                p if p in known or p.startswith(f"profiles.{name}.") else f"{p} (with profile {name!r})" for p in found
            ]

    if profile is not None and profile not in overlays:
        names = (
            [str(n) for n in (document.get("profiles") or {})] if isinstance(document.get("profiles"), Mapping) else []
        )
        if profile not in names:
            allowed = "must be one of " + ", ".join(repr(n) for n in names) if names else "the file defines no profiles"
            hint = suggest_key(profile, names) if names else None
            problems.append(
                f"profile: {profile!r} is not allowed: {allowed}" + (f"; did you mean {hint!r}?" if hint else "")
            )

    problems = list(dict.fromkeys(problems))
    if problems:
        raise ConfigError(problems, source)
    chosen = configs.get(profile) if profile is not None else config
    assert chosen is not None  # no problems: every config was built
    return chosen.model_copy(update={"profile": profile, "source": source})
