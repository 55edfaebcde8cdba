"""Service discovery views of the same objects: kubelet's env vars and cluster DNS records.

Pure views (no I/O):
  `envvars`  — the `<SVC>_SERVICE_HOST`… variables kubelet injects (`kproxy-nft env`);
  `records`  — the DNS model of Services and ready endpoints (`RecordSet`);
  `resolver` — CoreDNS's answer to one question from a `RecordSet` (`lookup`);
  `protocol` — DNS messages in, DNS messages out (EDNS, truncation, malformed input);
  `zonefile` — the records as master files (`kproxy-nft dns records`).
Shell:
  `load`     — manifests → the views' inputs (reuses `sources.manifests.read_manifests`);
  `server`   — the UDP/TCP server over a record-set provider (`kproxy-nft dns serve`);
  `launch`   — start/stop the server inside a network namespace (for the demo);
  `commands` — the click commands.
"""
