"""Where Services and EndpointSlices come from: manifest files now, the Kubernetes API later."""
