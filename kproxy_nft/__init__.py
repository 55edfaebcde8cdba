"""kproxy-nft: Kubernetes Service networking (kube-proxy) as a Python rule compiler and node agent.

Layers, pure first: `model` (frozen values) ← `convert` (API objects → model) ←
`selection` (which endpoints a service port uses) ← `compile.<backend>` (rules as text).
The imperative shell: `sources` (manifests, later the API), `kernel` (apply), `cli`.
"""

__version__ = "0.1.0"
