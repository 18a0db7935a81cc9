"""Leaf names for pytrees and path-regex rules that map leaves to values.

A leaf is named by its key path joined with '/', e.g.
`backbone/block_3/expand/conv/kernel`. Rules are `[(regex, value), ...]`: the
first rule whose regex matches the whole name (`re.fullmatch`) gives the value;
`None` means "leave this leaf alone". A rule that matched no leaf is reported,
because a typo in a regex must not silently do nothing.
"""

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

Rules = Sequence[tuple[str, Any]]


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_to_name(path: Sequence[Any]) -> str:
    """Joins a JAX key path into a '/'-separated leaf name.

    Args:
      path: a key path from `jax.tree_util.tree_flatten_with_path`.

    Returns:
      The leaf name, e.g. 'backbone/stem/conv/kernel'.
    """
    return "/".join(_key_name(key) for key in path)


def leaf_names(tree: Any) -> list[str]:
    """Lists the names of all leaves of `tree` in flattening order."""
    return [path_to_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """Like `jax.tree.map`, but `fn(name, leaf)` also receives the leaf's name."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_to_name(path), leaf), tree)


def compile_rules(rules: Rules) -> list[tuple[re.Pattern, Any]]:
    """Compiles the regexes of `rules`, naming the rule that does not compile.

    Args:
      rules: `[(regex, value), ...]`.

    Returns:
      `[(compiled_regex, value), ...]` in the same order.

    Raises:
      ValueError: `rules` is not a sequence of (regex, value) pairs, or a regex does
        not compile; the message names the rule.
    """
    if isinstance(rules, str | bytes | Mapping) or not isinstance(rules, Sequence):
        hint = "; pass list(rules.items())" if isinstance(rules, Mapping) else ""
        raise ValueError(
            f"rules must be a list of (regex, value) pairs such as [(r'.*/kernel', 0.5)], "
            f"got {type(rules).__name__} {rules!r}{hint}"
        )
    compiled = []
    for index, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"rule {index} must be a (regex, value) pair, got {rule!r}")
        pattern, value = rule
        try:
            compiled.append((re.compile(pattern), value))
        except (re.error, OverflowError) as error:  # OverflowError: 'a{9999999999}'
            raise ValueError(f"rule {index} regex {pattern!r} does not compile: {error}") from None
    return compiled


def resolve_rules(tree: Any, rules: Rules, *, on_unmatched: str = "error") -> Any:
    """Maps every leaf of `tree` to the value of the first rule matching its name.

    Args:
      tree: any pytree (a Flax params dict, an nnx.State, a plain dict).
      rules: `[(regex, value), ...]`; a leaf that no rule matches gets `None`.
      on_unmatched: 'error', 'warn' or 'ignore' for rules that match no leaf.

    Returns:
      A pytree of the same structure as `tree` holding the chosen values.

    Example:
      >>> resolve_rules({"conv": {"kernel": 1, "bias": 2}}, [(".*/kernel", 0.5)])
      {'conv': {'bias': None, 'kernel': 0.5}}
    """
    if on_unmatched not in ("error", "warn", "ignore"):
        raise ValueError(f"on_unmatched must be 'error', 'warn' or 'ignore', got {on_unmatched!r}")
    compiled = compile_rules(rules)
    used = [False] * len(compiled)

    def choose(name: str, _: Any) -> Any:
        for index, (pattern, value) in enumerate(compiled):
            if pattern.fullmatch(name):
                used[index] = True
                return value
        return None

    # `None` values would vanish as pytree leaves, so map over names first.
    names = leaf_names(tree)
    values = [choose(name, None) for name in names]
    unmatched = [
        pattern.pattern for (pattern, _), hit in zip(compiled, used, strict=True) if not hit
    ]
    if unmatched and on_unmatched != "ignore":
        examples = f"leaf names look like {names[:3]}" if names else "the tree has no leaves"
        message = (
            f"rules matched no leaf: {unmatched}; {examples} "
            "(use jaxcomp.paths.leaf_names(params) to list them all)"
        )
        if on_unmatched == "error":
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    treedef = jax.tree_util.tree_structure(tree)
    return jax.tree_util.tree_unflatten(treedef, values)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nests `{'a/b': x}` into `{'a': {'b': x}}`: per-layer values kept under the layer's
    path, as checkpoints want (no '/' inside a key).

    Example:
      >>> nest({"head/conv": 1, "neck": 2})
      {'head': {'conv': 1}, 'neck': 2}
    """
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, last = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def lookup(tree: Mapping[str, Any], name: str) -> Any:
    """The value at '/'-separated `name` in nested dicts `tree` (the inverse of `nest`).

    Raises:
      KeyError: naming `name` when it is not there.

    Example:
      >>> lookup({"head": {"conv": 1}}, "head/conv")
      1
    """
    node: Any = tree
    for key in name.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"{name!r} is not in this tree")
        node = node[key]
    return node
