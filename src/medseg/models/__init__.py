"""medseg.models: model registry, weights resolution and SAM-family loading.

* :mod:`medseg.models.registry` — ``MODELS`` / ``get_spec(name)`` (no heavy imports).
* :mod:`medseg.models.weights` — ``medseg_home()``, ``resolve_weights``, ``download_file``,
  ``sha256_file`` (no torch).
* :mod:`medseg.models.sam` — ``build_sam_model``, ``load_sam_model`` → ``SamModel`` (imports torch).
* :mod:`medseg.models.accelerated` — ``accelerate(model, precision)`` fast CPU forward passes.

Importing this package imports nothing heavy.
"""
