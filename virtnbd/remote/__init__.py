"""Other KVM hosts: the ssh link to them (libvirt URI -> OpenSSH with pinned host keys)."""
