"""Service discovery views of the same objects: kubelet's env vars and cluster DNS records."""
