"""virtnbd: online, thin, incremental backups of libvirt/KVM domains over NBD."""

__version__ = "0.1.0"
