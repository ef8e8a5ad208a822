"""Registries of small plug-in files (merge methods, routers): name -> the object a file defines, importing
the file only when the name is looked up, so listing the names (for --method choices, man pages) stays cheap
and imports no torch. Reads and writes nothing.
"""

import importlib
from collections.abc import Iterator, Mapping

from lrtool.errors import UsageError


class Registry(Mapping):
    """name -> `package.file.METHOD`, imported on lookup; `what` names the kind in errors ("merge method")."""

    def __init__(self, package: str, files: dict[str, str], what: str):
        self.package, self._files, self.what = package, dict(files), what

    def __getitem__(self, name: str):
        return importlib.import_module(f"{self.package}.{self._files[name]}").METHOD

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def get(self, name: str):
        """The entry called `name`; a usage error listing the valid names when there is none."""
        if name not in self:
            raise UsageError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self)}")
        return self[name]

    def describe(self) -> list[dict]:
        """Each entry's `describe()` (name, summary, parameters), in registry order."""
        return [self[name].describe() for name in self]
