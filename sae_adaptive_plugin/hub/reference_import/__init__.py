"""SAEs saved by the papers' reference code, as this package's SAELens architectures.

Formats (a trainer folder ``…/trainer_0/`` of ``dictionary_learning``, ``ae.pt`` or
``ae.safetensors`` beside ``config.json``; state dicts of ``nn.Linear``, weights ``[out, in]``):

- ``adaptivek-ref`` (hiyukie/adaptiveK, ``AutoEncoderDynamicTopK``): ``encoder.weight [F, D]``,
  ``encoder.bias``, ``decoder.weight [D, F]``, ``b_dec``; the ``LinearProbe`` in ``probe.pt``
  (``weights [D, 1]``, ``bias [1]``, scores clamped to ``[0, 10]``); ``min_k``/``max_k`` from the
  config. → ``adaptivek``, label range ``[0, 10]``, steepness 6: the same k per row and code.
- ``softsae-ref`` (St0pien/SoftSAE, ``SoftSAE``): the same four tensors, the buffers ``k``,
  ``k_max``, ``alpha``, ``norm_factor`` and ``k_estimator.{0,2}.{weight,bias}``. → ``softsae``
  (``k = ⌊k̂⌋``). The reference divides its input by ``norm_factor`` and decodes in those units;
  the import folds ``1/norm_factor`` in (SAELens's fold): same code and k, and ``decode`` returns
  ``norm_factor ×`` the reference's, the reconstruction of the input in its own units.

What the architectures cannot express (a k range above ``dict_size``) is refused naming the field.
Only safetensors and ``torch.load(weights_only=True)`` are read. docs/hub.md has the details.
"""

from sae_adaptive_plugin.hub.reference_import.checkpoints import (
    FORMATS,
    ReferenceFiles,
    ReferenceImportError,
    convert_adaptivek,
    convert_softsae,
    import_reference,
    read_tensors,
    read_trainer_config,
    reference_format,
)
from sae_adaptive_plugin.hub.reference_import.loaders import (
    SAELENS_LOADERS,
    adaptivek_ref_disk_loader,
    adaptivek_ref_huggingface_loader,
    get_adaptivek_ref_config_from_hf,
    get_softsae_ref_config_from_hf,
    hub_files,
    import_command,
    local_files,
    register_reference_loaders,
    softsae_ref_disk_loader,
    softsae_ref_huggingface_loader,
)

__all__ = [
    "FORMATS",
    "SAELENS_LOADERS",
    "ReferenceFiles",
    "ReferenceImportError",
    "adaptivek_ref_disk_loader",
    "adaptivek_ref_huggingface_loader",
    "convert_adaptivek",
    "convert_softsae",
    "get_adaptivek_ref_config_from_hf",
    "get_softsae_ref_config_from_hf",
    "hub_files",
    "import_command",
    "import_reference",
    "local_files",
    "read_tensors",
    "read_trainer_config",
    "reference_format",
    "register_reference_loaders",
    "softsae_ref_disk_loader",
    "softsae_ref_huggingface_loader",
]
