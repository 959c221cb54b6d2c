"""Packaging for virtnbd. libvirt and libnbd bindings come from Debian
(python3-libvirt, python3-libnbd): never list ``nbd`` here, that PyPI name
is an unrelated package."""
from setuptools import find_packages, setup

from virtnbd import __version__

setup(
    name="virtnbd",
    version=__version__,
    description="Online, thin, incremental backup and restore of libvirt/KVM domains over NBD",
    packages=find_packages(include=["virtnbd", "virtnbd.*"]),
    python_requires=">=3.11",
    install_requires=["cryptography>=38", "lxml", "lz4", "tqdm", "xxhash", "zstandard"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis", "ruff", "mypy", "lxml-stubs", "types-tqdm"],
    },
    entry_points={
        "console_scripts": [
            "virtnbdbackup = virtnbd.cli.backup:main",
            "virtnbdrestore = virtnbd.cli.restore:main",
            "virtnbdprune = virtnbd.cli.prune:main",
            "virtnbdmap = virtnbd.cli.map:main",
            "virtnbdmount = virtnbd.cli.mount:main",
            "virtnbdjob = virtnbd.cli.job:main",
            "virtnbdkey = virtnbd.cli.key:main",
        ]
    },
)
