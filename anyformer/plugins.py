"""User variants registered outside the package: the modules every command imports first.

A plugin is a Python module whose import registers variants (`@ATTENTIONS.register(...)`,
`@TASKS.register(...)`, ...). It is named in one of four places, imported in this order:

- the `anyformer.plugins` entry-point group of an installed distribution
  (`[project.entry-points."anyformer.plugins"] mine = "my_package.variants"`);
- the environment variable ANYFORMER_PLUGINS (comma-separated);
- `--import MODULE` on any command (repeatable);
- the `plugins` list of a run config (written there by `anyformer train`, so that every later
  command on the run, and `compare`'s training processes, import them again).

A module is a dotted name (looked up on sys.path, with the working directory added at the
end) or a path to a .py file. A module that cannot be imported is a PluginError naming it and
where it was named; an error raised inside the module while it imports is shown as that module's.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .config import ConfigError

ENV_VAR = "ANYFORMER_PLUGINS"
ENTRY_POINT_GROUP = "anyformer.plugins"

# plugin specs imported in this process (as recorded: module names, or absolute .py paths), in order
_IMPORTED: list[str] = []
_ENTRY_POINTS_DONE = False


class PluginError(ConfigError):
    """A plugin module that cannot be imported."""


def normalize(spec: str) -> str:
    """`spec` as it is recorded: a .py path made absolute (so it is found from any folder), a
    module name as given."""
    spec = spec.strip()
    if spec.endswith(".py") or os.sep in spec:
        return str(Path(spec).expanduser().resolve())
    return spec


def _import_file(path: Path) -> None:
    """Import a .py file as the module its name gives (so a config naming that module finds it
    imported), or under a private name where a different module holds that name."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file {str(path)!r}")
    name = path.stem
    held = sys.modules.get(name)
    if held is not None:
        if getattr(held, "__file__", None) == str(path):
            return
        name = f"anyformer_plugin_{path.stem}"
    loader = importlib.util.spec_from_file_location(name, path)
    if loader is None or loader.loader is None:
        raise ImportError(f"{str(path)!r} is not a Python module")
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    try:
        loader.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def import_plugin(spec: str, *, named_by: str) -> str:
    """Import one plugin (a dotted module name or a .py path) once per process and return it as
    recorded; `named_by` says where it was named, for the error."""
    recorded = normalize(spec)
    if not recorded:
        raise PluginError(f"an empty plugin module name ({named_by}); give a module name or a .py file")
    if recorded in _IMPORTED:
        return recorded
    cwd = os.getcwd()
    if cwd not in sys.path:  # `anyformer` run as a console script does not look in the working directory
        sys.path.append(cwd)
    try:
        if recorded.endswith(".py") or os.sep in recorded:
            _import_file(Path(recorded))
        else:
            importlib.import_module(recorded)
    except (ImportError, FileNotFoundError) as e:
        missing = getattr(e, "name", None)
        inner = f" (it imports {missing!r}, which is missing)" if missing and missing != recorded.split(".")[0] else ""
        raise PluginError(
            f"cannot import plugin module {recorded!r}, named by {named_by}{inner}: {e}. Install it, put its folder on "
            "PYTHONPATH, run from the folder that holds it, or give the path of its .py file") from None
    except Exception as e:
        raise PluginError(f"plugin module {recorded!r} (named by {named_by}) failed while importing: "
                          f"{type(e).__name__}: {e}") from e
    _IMPORTED.append(recorded)
    return recorded


def import_plugins(specs: list[str] | tuple[str, ...], *, named_by: str) -> list[str]:
    """Import each of `specs` (see import_plugin); the recorded forms, in order."""
    return [import_plugin(s, named_by=named_by) for s in specs]


def from_environment() -> list[str]:
    """Import the installed entry points (once per process) and the modules named by
    ANYFORMER_PLUGINS; the recorded forms of the latter."""
    global _ENTRY_POINTS_DONE
    if not _ENTRY_POINTS_DONE:
        _ENTRY_POINTS_DONE = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as e:
                raise PluginError(f"the installed plugin {ep.name!r} ({ep.value}, entry point group "
                                  f"{ENTRY_POINT_GROUP!r} of {getattr(ep.dist, 'name', 'a distribution')}) cannot be "
                                  f"imported: {type(e).__name__}: {e}") from None
    specs = [s for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]
    return import_plugins(specs, named_by=f"the environment variable {ENV_VAR}")


def imported() -> list[str]:
    """The plugin modules imported in this process so far (entry points aside), as recorded."""
    return list(_IMPORTED)


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default os.environ) for a subprocess that must import the same plugins."""
    env = dict(os.environ if env is None else env)
    if _IMPORTED:
        env[ENV_VAR] = ",".join(_IMPORTED)
    return env
