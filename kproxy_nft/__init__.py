"""kproxy-nft: Kubernetes Service networking (kube-proxy) as a Python rule compiler and node agent.

Layers, pure first: `model` (frozen values) ← `convert` (API objects → model) ←
`selection` (which endpoints a service port uses) ← `compile.<backend>` (rules as text).
The imperative shell: `sources` (manifests, later the API), `kernel` (apply), `cli`.
"""

__version__ = "0.1.0"


def _load_kubernetes_package_lazily() -> None:
    """Make `kubernetes` an empty package whose submodules are imported only where used.

    The official client's `kubernetes/__init__.py` imports `config`, `dynamic`, `watch`,
    `stream`, `utils`, `leaderelection` and `informer` eagerly: 0.12 s, a third of a one-shot
    command's import time, spent even by `dump`, which needs only the client's models (issue
    14). Registering the package's module without running its `__init__` keeps
    `import kubernetes.client` and `from kubernetes import config, watch` working as before:
    each loads its own submodule. Nothing here reads the package's only other names,
    `__project__` and `__version__`.
    """
    import importlib.util
    import sys

    if "kubernetes" in sys.modules:
        return  # already imported (e.g. by a test harness): nothing to save
    spec = importlib.util.find_spec("kubernetes")
    if spec is None:
        return  # not installed: the import that needs it says so
    sys.modules["kubernetes"] = importlib.util.module_from_spec(spec)


_load_kubernetes_package_lazily()
