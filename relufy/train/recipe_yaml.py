"""Recipe YAML read within bounds: a recipe file, or an override's value, is refused on one line
when reading it would take unbounded time or memory, or would silently drop what it says.

- **Duplicate keys** (``budget: ...`` twice in one mapping, where YAML loaders keep the last):
  refused, naming the key and both lines. Merge keys (``<<: *base``) still override as YAML says.
- **Aliases**: a document may expand, aliases followed, to at most ``MAX_NODES`` values (a
  "billion laughs" of 9 lines expands to about 10^9 and is refused at once: sizes are counted on
  the composed node graph, each shared node once); an alias inside the collection it names (a
  recursive alias) is refused.
- **Nesting**: at most ``MAX_DEPTH`` levels, aliases followed (deeper nesting would exhaust
  Python's recursion in the YAML loader or in the walks after it).
- **Integers**: at most ``MAX_INT_DIGITS`` characters (Python refuses to convert decimal
  strings of more than 4,300 digits; no recipe value needs more than 20).

``relufy.train.recipe.validate`` applies the same node, depth and number bounds to any
recipe dict (built in Python, or from overrides), with the field's dotted path.
"""

from __future__ import annotations

import yaml

from ..errors import RelufyError

MAX_NODES = 100_000
MAX_DEPTH = 64
MAX_INT_DIGITS = 40
_MERGE = "tag:yaml.org,2002:merge"


def short(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters (error messages quote what the user gave)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _line(node_or_mark) -> int:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return (mark.line + 1) if mark is not None else 0


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the bounds of this module; ``origin`` prefixes its messages."""

    origin = "recipe"

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def _where(self, mark) -> str:
        line = _line(mark)
        return f"{self.origin}: line {line}" if line else self.origin

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise RelufyError(f"{self._where(self.peek_event().start_mark)}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _measure(node, self._where)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the loader refuses it itself
                    continue
                if first is not None:
                    raise RelufyError(
                        f"{self._where(key_node)}: key {short(repr(key))} appears twice in one mapping (first on line "
                        f"{first}); YAML would keep only the last: give it once"
                    )
                seen[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if len(text) > MAX_INT_DIGITS:
            raise RelufyError(
                f"{self._where(node)}: an integer of {len(text):,} characters; recipe numbers have at most "
                f"{MAX_INT_DIGITS} digits"
            )
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _measure(root, where) -> None:
    """Refuse a node graph whose expansion (aliases followed) exceeds ``MAX_NODES`` values or
    ``MAX_DEPTH`` levels, or that contains itself. Each node's (size, height) is computed once."""
    done: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def visit(node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in done:
            size, height = done[key]
        else:
            if key in active:
                raise RelufyError(f"{where(node)}: an alias refers to a collection that contains it (a recursive alias)")
            if depth > MAX_DEPTH:
                raise RelufyError(f"{where(node)}: nested more than {MAX_DEPTH} levels deep (aliases followed)")
            active.add(key)
            size, height = 1, 0
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = []
            for child in children:
                child_size, child_height = visit(child, depth + 1)
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_NODES:
                    raise RelufyError(
                        f"{where(node)}: its aliases expand to more than {MAX_NODES:,} values; a recipe holds fewer"
                    )
            active.discard(key)
            done[key] = (size, height)
        if depth + height > MAX_DEPTH:
            raise RelufyError(f"{where(node)}: nested more than {MAX_DEPTH} levels deep (aliases followed)")
        return size, height

    visit(root, 1)


def load(text: str, origin: str):
    """The YAML document ``text`` within this module's bounds; ``yaml.YAMLError`` for text that
    is not YAML, ``RelufyError`` (its message starting with ``origin``) for what is refused."""
    loader = type("_Loader", (_BoundedLoader,), {"origin": origin})(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
