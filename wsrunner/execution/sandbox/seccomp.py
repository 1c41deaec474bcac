"""The seccomp filter every sandboxed command runs under, built once at start-up.

A deny list in the spirit of Docker's default profile and Flatpak's: system calls that reach
kernel surface a workspace never needs (keyrings, BPF, perf, userfaultfd, io_uring), that
change what the sandbox is (mount, namespaces, pivot_root), or that inspect or steer other
processes (ptrace, process_vm_*). Each fails with EPERM, so a program that probes for one
degrades as it would on a locked-down host. `clone3` fails with ENOSYS: libc falls back to
`clone`, whose namespace flags the filter can see (clone3 passes them in memory it cannot).
`ioctl(TIOCSTI)` and `ioctl(TIOCLINUX)` are refused: they push input into a terminal.
System calls of another architecture (32-bit x86 on x86-64) kill the thread: the filter
covers the native table only, so it must not be bypassed through another one.

bubblewrap loads the program (`--seccomp FD`) just before it executes the command.
"""

from __future__ import annotations

import errno
import os
from typing import Final

import pyseccomp as seccomp

#: Refused with EPERM.
DENIED: Final = (
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_madvise",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
)
#: clone(2) flags that make new namespaces (all but CLONE_NEWTIME, which needs CAP_SYS_ADMIN).
NAMESPACE_FLAGS: Final = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)
#: ioctl requests that inject terminal input.
TTY_INJECTION: Final = (0x5412, 0x541C)  # TIOCSTI, TIOCLINUX


class SeccompUnavailableError(RuntimeError):
    """libseccomp could not build the filter (missing, or too old for this kernel's table)."""


def build() -> bytes:
    """The filter as a BPF program for `bwrap --seccomp`.

    Errors: SeccompUnavailableError naming what failed.
    """
    try:
        rules = seccomp.SyscallFilter(seccomp.ALLOW)
        for name in DENIED:
            try:
                rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
            except (OSError, ValueError):  # not in this architecture's table: nothing to deny
                continue
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        for flag in NAMESPACE_FLAGS:
            rules.add_rule(
                seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag)
            )
        for request in TTY_INJECTION:
            rules.add_rule(
                seccomp.ERRNO(errno.EPERM),
                "ioctl",
                seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request),
            )
        with os.fdopen(os.memfd_create("wsrunner-seccomp"), "w+b") as out:
            rules.export_bpf(out)
            out.seek(0)
            return out.read()
    except (OSError, RuntimeError, AttributeError) as exc:
        raise SeccompUnavailableError(f"libseccomp: {exc}") from None
