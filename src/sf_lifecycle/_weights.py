"""The weights file of a blue/green rollout: find the weighted service, rewrite only its weights.

The file is a Traefik dynamic-configuration YAML in the file provider's watched directory,
holding one weighted round-robin service with two children (stable and candidate):

    http:
      services:
        sf-weighted:
          weighted:
            services:
              - name: sf             # stable
                weight: 100
              - name: sf-candidate   # candidate
                weight: 0

Deliberate choices:

- The rewrite is textual: PyYAML's node marks give the exact span of each `weight` value, and
  only those characters change, so the operator's comments, key order and every other key stay
  as they were. The result is parsed again and compared with the original (weights aside)
  before anything is written.
- Only weights written as a plain or quoted decimal integer (`100`, `"0"`) are rewritable;
  an anchor, alias, tag or block scalar on a weight is refused at load (`WeightsError`), so a
  file that the rewrite would break is refused before anything changes. Line endings (CRLF)
  are kept.
- The write is atomic: a temporary file in the same directory (a dot name without a `.yaml`
  suffix, which Traefik's directory watch skips), fsynced, renamed over the file, then the
  directory fsynced. Traefik sees the old file or the new one, never a torn write, and a crash
  leaves one of the two on disk. The new file keeps the old one's mode and owner/group (as
  root, against a file owned by Traefik's user, a root-owned file would be unreadable to
  Traefik); when the owner cannot be kept, nothing is written.
- A symbolic link is written through: the link stays, its target is replaced (temporary file
  and rename in the target's directory). Traefik notices the change only if the target is in
  a watched directory too; otherwise the rollout stops (Traefik does not load the new
  weights) and the stable keeps all traffic.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["WeightsError", "WeightsFile", "split_provider"]

CANDIDATE_SUFFIX = "-candidate"
# What the rewrite replaces: a decimal integer, bare or quoted (Traefik reads both).
_PLAIN_WEIGHT = re.compile(r"""(0|[1-9][0-9]*)|"(0|[1-9][0-9]*)"|'(0|[1-9][0-9]*)'""")


class WeightsError(ValueError):
    """The weights file cannot be used: unreadable, malformed, or not naming the services given."""


def split_provider(name: str) -> tuple[str, str | None]:
    """`sf-candidate@docker` -> (`sf-candidate`, `docker`); `sf` -> (`sf`, None)."""
    base, sep, provider = name.partition("@")
    return base, (provider if sep else None)


def _key(node: yaml.Node) -> str:
    return str(node.value).lower() if isinstance(node, yaml.ScalarNode) else ""


def _get(node: yaml.Node | None, key: str) -> yaml.Node | None:
    # Traefik reads keys case-insensitively (`weighted` == `Weighted`).
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if _key(k) == key:
            found: yaml.Node = v
            return found
    return None


@dataclass(frozen=True, slots=True)
class _Child:
    name: str
    weight: int
    node: yaml.ScalarNode


@dataclass(frozen=True, slots=True)
class WeightsFile:
    """One parsed weights file: the weighted service, its stable and candidate children.

    Build it with `WeightsFile.load(path, stable=..., candidate=...)`.
    """

    path: Path
    text: str
    service: str
    stable: str
    candidate: str
    _children: tuple[_Child, _Child]

    @property
    def weights(self) -> dict[str, int]:
        """Child name -> weight, stable first."""
        by_name = {c.name: c.weight for c in self._children}
        return {self.stable: by_name[self.stable], self.candidate: by_name[self.candidate]}

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        stable: str | None = None,
        candidate: str | None = None,
        service: str | None = None,
    ) -> WeightsFile:
        """Read `path` and identify its weighted service and the two children.

        Args:
            path: The YAML file.
            stable: Name of the stable child as written in the file; see `candidate`.
            candidate: Name of the candidate child. Without `stable`/`candidate`, the child
                whose name (before any `@provider`) ends in `-candidate` is the candidate and
                the other one is stable.
            service: Name of the weighted service, needed only when the file has several.

        Raises:
            WeightsError: the file cannot be read or parsed, has no (or an ambiguous) weighted
                service, the service does not have exactly two children with integer weights,
                or a name given is not one of them. The message says which and how to fix it.
        """
        p = Path(path)
        try:
            with p.open(encoding="utf-8", newline="") as f:  # newline="": keep CRLF as is
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise WeightsError(f"{p}: cannot read the weights file: {exc}") from None
        try:
            root = yaml.compose(text)
        except yaml.YAMLError as exc:
            raise WeightsError(f"{p}: not valid YAML: {exc}") from None
        services = _get(_get(root, "http"), "services")
        weighted: dict[str, yaml.Node] = {}
        if isinstance(services, yaml.MappingNode):
            for k, v in services.value:
                w = _get(v, "weighted")
                if w is not None:
                    weighted[str(k.value)] = w
        if not weighted:
            raise WeightsError(
                f"{p}: no weighted service (http.services.<name>.weighted) in this file; the "
                f"rollout needs one with two children, see infra/traefik/dynamic/weights.yaml"
            )
        if service is None:
            if len(weighted) > 1:
                raise WeightsError(
                    f"{p}: {len(weighted)} weighted services ({', '.join(sorted(weighted))}); "
                    f"name one with --service"
                )
            service = next(iter(weighted))
        elif service not in weighted:
            raise WeightsError(
                f"{p}: no weighted service {service!r}; the file has {', '.join(sorted(weighted))}"
            )
        children = cls._children_of(p, text, service, weighted[service])
        names = [c.name for c in children]
        stable, candidate = cls._roles(p, service, names, stable, candidate)
        return cls(p, text, service, stable, candidate, (children[0], children[1]))

    @staticmethod
    def _children_of(p: Path, text: str, service: str, weighted: yaml.Node) -> list[_Child]:
        items = _get(weighted, "services")
        where = f"{p}: weighted service {service!r}"
        if not isinstance(items, yaml.SequenceNode) or len(items.value) != 2:
            n = len(items.value) if isinstance(items, yaml.SequenceNode) else 0
            raise WeightsError(
                f"{where} must list exactly two services (stable, candidate), not {n}"
            )
        children: list[_Child] = []
        for item in items.value:
            name = _get(item, "name")
            weight = _get(item, "weight")
            if not isinstance(name, yaml.ScalarNode) or not str(name.value):
                raise WeightsError(f"{where}: a child has no name")
            if not isinstance(weight, yaml.ScalarNode):
                raise WeightsError(
                    f"{where}: child {name.value!r} has no weight; write it out "
                    f"(e.g. `weight: 0`) so the rollout can change it"
                )
            if sum(1 for k, _ in item.value if _key(k) == "weight") > 1:
                raise WeightsError(f"{where}: child {name.value!r} has two `weight` keys")
            try:
                value = int(str(weight.value))
            except ValueError:
                value = -1
            if value < 0:
                raise WeightsError(
                    f"{where}: child {name.value!r} has weight {weight.value!r}; "
                    f"weights are integers >= 0"
                )
            source = text[weight.start_mark.index : weight.end_mark.index]
            if _PLAIN_WEIGHT.fullmatch(source) is None or any(c.node is weight for c in children):
                raise WeightsError(
                    f"{where}: child {name.value!r} has weight written as {source.strip()!r}; "
                    f"the rollout rewrites only a plain decimal number (e.g. `weight: 100`): "
                    f"no anchor, alias, tag or block scalar"
                )
            children.append(_Child(str(name.value), value, weight))
        if children[0].name == children[1].name:
            raise WeightsError(f"{where}: both children are named {children[0].name!r}")
        return children

    @staticmethod
    def _roles(
        p: Path, service: str, names: list[str], stable: str | None, candidate: str | None
    ) -> tuple[str, str]:
        listed = f"{names[0]!r} and {names[1]!r}"
        for flag, given in (("--stable", stable), ("--candidate", candidate)):
            if given is not None and given not in names:
                raise WeightsError(
                    f"{p}: {flag} {given!r} is not a child of weighted service {service!r} "
                    f"(its children are {listed})"
                )
        if stable is not None and candidate is not None:
            if stable == candidate:
                raise WeightsError(f"{p}: --stable and --candidate are both {stable!r}")
            return stable, candidate
        if stable is not None:
            return stable, next(n for n in names if n != stable)
        if candidate is not None:
            return next(n for n in names if n != candidate), candidate
        marked = [n for n in names if split_provider(n)[0].endswith(CANDIDATE_SUFFIX)]
        if len(marked) != 1:
            raise WeightsError(
                f"{p}: cannot tell stable from candidate among {listed}: "
                f"{'both' if marked else 'neither'} end(s) in {CANDIDATE_SUFFIX!r}; "
                f"pass --stable NAME and --candidate NAME"
            )
        return next(n for n in names if n != marked[0]), marked[0]

    def render(self, weights: Mapping[str, int]) -> str:
        """The file's text with only the children's weights replaced.

        Raises:
            WeightsError: a name that is not a child, or a negative weight.
        """
        edits: list[tuple[int, int, str]] = []
        for child in self._children:
            w = weights.get(child.name, child.weight)
            if isinstance(w, bool) or not isinstance(w, int) or w < 0:
                raise WeightsError(f"weight of {child.name!r} must be an integer >= 0, not {w!r}")
            edits.append((child.node.start_mark.index, child.node.end_mark.index, str(w)))
        unknown = set(weights) - {c.name for c in self._children}
        if unknown:
            raise WeightsError(f"not children of {self.service!r}: {', '.join(sorted(unknown))}")
        text = self.text
        for start, end, value in sorted(edits, reverse=True):
            text = text[:start] + value + text[end:]
        self._same_but_weights(text, weights)
        return text

    def _same_but_weights(self, new_text: str, weights: Mapping[str, int]) -> None:
        # The splice must not have changed anything else: compare the parsed documents.
        try:
            before: Any = yaml.safe_load(self.text)
            after: Any = yaml.safe_load(new_text)
        except yaml.YAMLError as exc:
            raise WeightsError(
                f"{self.path}: rewriting the weights would not give valid YAML ({exc}); "
                f"write each weight as a plain number (e.g. `weight: 100`)"
            ) from None
        for child in _lowered_children(before, self.service):
            if child.get("name") in weights:
                for k in list(child):
                    if str(k).lower() == "weight":
                        child[k] = weights[child["name"]]
        if before != after:
            raise WeightsError(f"{self.path}: rewriting the weights would change other keys")

    @property
    def target(self) -> Path:
        """The file that is replaced: `path`, or the final target when `path` is a symlink."""
        return self.path.resolve(strict=True) if self.path.is_symlink() else self.path

    def check_rewritable(self) -> None:
        """Render the rewrites a rollout and an `--abort` make, in memory only.

        Raises:
            WeightsError: the rewrite would not give the same document with new weights.
        """
        self.render({self.stable: 0, self.candidate: 100})
        self.render({self.stable: 100, self.candidate: 0})

    def write(self, weights: Mapping[str, int]) -> WeightsFile:
        """Atomically replace the file with `weights` set; the reloaded file.

        A symlink is kept and its target replaced. The new file keeps the mode, owner and group
        of the old one.

        Raises:
            WeightsError: bad weights, or the owner cannot be kept (nothing written).
            OSError: the directory cannot be written (nothing replaced).
        """
        text = self.render(weights)
        try:
            target = self.target
        except OSError as exc:
            raise WeightsError(f"{self.path}: cannot resolve the symbolic link: {exc}") from None
        d = target.parent
        st = target.stat()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                own = os.fstat(f.fileno())
                if (own.st_uid, own.st_gid) != (st.st_uid, st.st_gid):
                    try:
                        os.fchown(f.fileno(), st.st_uid, st.st_gid)
                    except OSError as exc:
                        raise WeightsError(
                            f"{target}: cannot keep its owner {st.st_uid}:{st.st_gid} on the "
                            f"rewritten file ({exc.strerror}); Traefik might no longer read "
                            f"it. Run as that user (or root); nothing was changed"
                        ) from None
                f.write(text)
                f.flush()
                os.fchmod(f.fileno(), st.st_mode & 0o7777)
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The rename is durable only once the directory entry is on disk.
        dir_fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return WeightsFile.load(
            self.path, stable=self.stable, candidate=self.candidate, service=self.service
        )


def _lowered_children(doc: Any, service: str) -> list[dict[Any, Any]]:
    def get(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            for k, v in node.items():
                if str(k).lower() == key:
                    return v
        return None

    svc = get(get(get(doc, "http"), "services"), service.lower())
    items = get(get(svc, "weighted"), "services")
    return [c for c in items if isinstance(c, dict)] if isinstance(items, list) else []
