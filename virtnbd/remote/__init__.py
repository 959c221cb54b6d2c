"""Remote KVM hosts: the libvirt URI's host reached over OpenSSH and NBD over TLS.

- :mod:`options`  the frozen remote options (built by ``cli/remoteargs.py``)
- :mod:`uri`      which libvirt URIs are remote; host, user, port and key of one; host-key pinning
- :mod:`ssh`      one OpenSSH ControlMaster connection per run (host key checked, timeouts)
- :mod:`host`     THE interface to the host the disks live on (``Host``): run a command, read a
                  file or folder, a private work folder, NBD exports; ``LocalHost`` and
                  ``RemoteHost``; ``current()`` is the run's host
- :mod:`nbd`      where a backup job's NBD server listens and how the client reaches it (TLS, ports)

The restore side (restore/targets/remote.py) uses :mod:`ssh` too (``RestoreSsh`` adds a socket
forward and the ``--password-file`` askpass helper).
"""
