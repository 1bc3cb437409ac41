"""`kiln deploy`: Kubernetes and KServe manifests for a spec, built from typed objects.

Every object is a ``kubernetes.client`` model (or, for KServe's custom resources, a typed
model in ``kserve.py`` whose containers are ``kubernetes.client`` models), turned into a
plain dict by :func:`kiln.deploy.k8s.to_dict` and validated offline
(``validate.py``: the Kubernetes OpenAPI schemas of ``kubernetes-validate``, strict; KServe's
CRD schemas vendored in ``schemas/``) before ``writer.py`` writes any file. Nothing is
templated as text: a typo in a field name fails where the object is built, a wrong type or
an unknown field fails validation, naming the object and the field.

Only the spec is read (names, ports, task, instances): no export or repository is needed
to write the manifests; the repository reaches the cluster inside an image (the default) or
from object storage.
"""
