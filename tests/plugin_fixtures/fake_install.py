"""Install a fixture distribution into a folder on sys.path without pip (see README.md)."""

import configparser
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent


def fake_install(site, name):
    """Write fixture `name`'s dist-info (METADATA, entry_points.txt) and its module(s) into the folder `site`.

    Returns the distribution name.
    """
    src = FIXTURES / name
    cfg = configparser.ConfigParser()
    if not cfg.read(src / "setup.cfg"):
        raise FileNotFoundError(src / "setup.cfg")
    dist, version = cfg["metadata"]["name"], cfg["metadata"]["version"]
    info = Path(site) / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    groups = cfg["options.entry_points"] if cfg.has_section("options.entry_points") else {}
    (info / "entry_points.txt").write_text("".join(f"[{group}]\n{value.strip()}\n\n"
                                                   for group, value in groups.items()))
    for item in src.iterdir():
        if item.name in ("setup.cfg", "__pycache__"):
            continue
        copy = shutil.copytree if item.is_dir() else shutil.copy2
        copy(item, Path(site) / item.name)
    return dist
