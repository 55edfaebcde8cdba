"""Kernel backends: read what the kernel holds, diff it against compiled rules, apply atomically.

One module family per backend, the pure parts apart from the shell that runs commands:

* `runner`: the injectable command runner (`Runner`, `SubprocessRunner`) and `ip netns exec`
  wrapping, shared by every backend;
* iptables: `iptables_text` (iptables-save text ⇄ `KernelState`), `iptables_rule` (a rule's
  canonical form, as iptables-save prints it), `iptables_plan` (pure diff → one
  `iptables-restore --noflush` payload), `iptables` (the shell: backend detection, read,
  apply with rollback, cleanup; the CLI's entry points), `iptables_fake` (an in-memory
  iptables-restore for tests).
"""
