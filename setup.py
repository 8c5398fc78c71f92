"""Package discovery for the pelmark namespace; everything else is in pyproject.toml.

The stages live in top-level folders (``synth/``, ``train/``, ``evaluate/``) but install as
``pelmark.synth`` and so on, so that their generic names cannot collide with other
distributions (``evaluate`` is one on PyPI). setuptools' declarative ``packages.find`` cannot
put a prefix on what it finds, so the packages are discovered here: a new sub-folder with an
``__init__.py`` is in the wheel without anyone listing it.
"""

from setuptools import find_packages, setup

# Import name -> folder, relative to this file.
PACKAGE_ROOTS = {
    "pelmark": "pelmark",
    "pelmark.synth": "synth",
    "pelmark.train": "train",
    "pelmark.evaluate": "evaluate",
}


def discover_packages() -> list[str]:
    packages = []
    for name, folder in PACKAGE_ROOTS.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return sorted(packages)


setup(package_dir=PACKAGE_ROOTS, packages=discover_packages())
