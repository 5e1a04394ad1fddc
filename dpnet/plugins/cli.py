"""List dpnet's plugins: ``python -m dpnet.plugins [--json]``.

Prints each plugin's name, distribution, version, status and what it provides (layers by kind, update rules, models),
dpnet's built-ins first; disabled plugins (``DPNET_DISABLE_PLUGINS``, ``DPNET_DISABLE_PLUGIN_AUTOLOAD``) and broken
ones are listed too, with the reason. Exits with status 2 when a plugin is broken (so that CI notices), else 0.

``--json`` prints ``{"plugins": [{"name", "distribution", "version", "module", "builtin", "status", "reason",
"layers": {kind: [names]}, "update_rules": [names], "models": [names]}, ...], "autoload": bool, "errors":
[messages]}``; the layer kinds are activation, normalization, loss and layer.
"""

import argparse
import json

from . import registry
from .loader import NO_AUTOLOAD_ENV, env_flag


def _provides(info):
    lines = [f"{kind}: {', '.join(names)}" for kind, names in info.layers.items() if names]
    if info.update_rules:
        lines.append(f"update rules: {', '.join(info.update_rules)}")
    if info.models:
        lines.append(f"models: {', '.join(info.models)}")
    if info.status != "loaded":
        lines = [f"({info.reason})" if info.status == "disabled" else "(failed to load: see below)"]
    return lines or ["(nothing)"]


def format_table(infos):
    """The plugins as a text table, one row per plugin and one line per kind it provides."""
    header = ("plugin", "distribution", "version", "status", "provides")
    rows = []
    for info in infos:
        status = "built-in" if info.builtin else info.status
        provides = _provides(info)
        rows.append((info.name, info.distribution or "-", info.version or "-", status, provides[0]))
        rows.extend(("", "", "", "", line) for line in provides[1:])
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]

    def line(row):
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4]

    rule = ("-" * widths[0], "-" * widths[1], "-" * widths[2], "-" * widths[3], "-" * len(header[4]))
    out = [line(header), line(rule), *(line(row) for row in rows)]
    errors = [info for info in infos if info.status == "error"]
    if errors:
        out += ["", "errors:"] + [f"- {info.reason}" for info in errors]
    return "\n".join(out)


def main(argv=None):
    """Print the listing (argv: the arguments, default sys.argv[1:]); return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m dpnet.plugins",
                                     description="List dpnet's plugins: built-ins and those installed through the "
                                                 "'dpnet' entry point group.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    infos = registry.list_plugins()
    errors = [info.reason for info in infos if info.status == "error"]
    if args.json:
        autoload = not env_flag(NO_AUTOLOAD_ENV)
        print(json.dumps({"plugins": [info.to_dict() for info in infos], "autoload": autoload, "errors": errors},
                         indent=2))
    else:
        print(format_table(infos))
    return 2 if errors else 0  # a broken plugin is bad input, as for every other dpnet command
