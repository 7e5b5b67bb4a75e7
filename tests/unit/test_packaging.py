from __future__ import annotations

from importlib.metadata import version

import sf_lifecycle


def test_version_comes_from_package_metadata() -> None:
    assert sf_lifecycle.__version__ == version("sf-lifecycle")


def test_public_api_is_small_sorted_and_importable() -> None:
    names = sf_lifecycle.__all__

    def isort_style(name: str) -> tuple[int, str]:
        # Constants, then classes, then functions, as ruff's RUF022 orders them.
        kind = 0 if name.isupper() else 1 if name[:1].isupper() else 2
        return kind, name

    assert names == sorted(names, key=isort_style)
    assert len(set(names)) == len(names)
    assert len(names) <= 40
    for name in names:
        assert getattr(sf_lifecycle, name) is not None


def test_typed_marker_is_shipped() -> None:
    from importlib.resources import files

    assert files("sf_lifecycle").joinpath("py.typed").is_file()
